//! linkerd proxy-init's flags: any command line either fails with an error naming a flag, or
//! gives a pod spec that validates, survives the registration API unchanged and prints the same
//! `--simulate` table before and after.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockmesh::{
    core::spec::PodSpec,
    init::{dry_run::decision_table, flags::CommandLine, linkerd::LinkerdArgs},
};
use sockmesh_api::pb;
use sockmesh_fuzz::Invocation;

fuzz_target!(|data: &[u8]| {
    let inv = Invocation::from_bytes("proxy-init", data);
    let Ok(args) = LinkerdArgs::parse_argv(inv.argv) else {
        return;
    };
    let Ok((spec, _action)) = args.to_spec() else {
        return;
    };
    if let Err(e) = spec.validate() {
        panic!("flags gave a spec the agent refuses: {e}\n{spec:?}");
    }
    let back = PodSpec::try_from(pb::PodSettings::from(&spec)).expect("decodes its own settings");
    assert_eq!(back, spec, "the spec changed on the wire");
    let local = ["127.0.0.1".parse().unwrap(), "192.0.2.10".parse().unwrap()];
    assert_eq!(decision_table(&back, &local), decision_table(&spec, &local));
});
