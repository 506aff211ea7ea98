//! istio-iptables' flags and environment: any command line either fails with an error naming
//! a flag, or gives a pod spec that validates, survives the registration API unchanged and
//! prints the same `--dry-run` table before and after.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockmesh::{
    core::spec::PodSpec,
    init::{
        dry_run::decision_table,
        flags::CommandLine,
        istio::{IfAddr, IstioArgs},
    },
};
use sockmesh_api::pb;
use sockmesh_fuzz::Invocation;

fuzz_target!(|data: &[u8]| {
    let inv = Invocation::from_bytes("istio-iptables", data);
    let Ok(args) = IstioArgs::parse_argv(inv.argv.clone()) else {
        return;
    };
    let addrs: Vec<IfAddr> = ["127.0.0.1", "192.0.2.10", "2001:db8::10"]
        .iter()
        .map(|a| IfAddr {
            ip: a.parse().unwrap(),
        })
        .collect();
    let Ok((spec, _action)) = args.to_spec(&inv, &addrs) else {
        return;
    };
    round_trips(&spec, &addrs);
});

fn round_trips(spec: &PodSpec, addrs: &[IfAddr]) {
    if let Err(e) = spec.validate() {
        panic!("flags gave a spec the agent refuses: {e}\n{spec:?}");
    }
    let wire = pb::PodSettings::from(spec);
    let back = PodSpec::try_from(wire).expect("a valid spec decodes from its own settings");
    assert_eq!(&back, spec, "the spec changed on the wire");
    let local: Vec<_> = addrs.iter().map(|a| a.ip).collect();
    assert_eq!(decision_table(&back, &local), decision_table(spec, &local));
}
