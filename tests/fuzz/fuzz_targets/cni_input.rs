//! The CNI plugin's input: the network configuration on stdin (with prevResult and
//! runtimeConfig's pod annotations) and CNI_ARGS. Whatever they hold, the plugin decodes or
//! refuses them with a CNI error, passes prevResult on unchanged, and the istio-iptables
//! command line it derives from the annotations parses or fails naming a flag.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockmesh::{
    cni::plugin::{decode_conf, istio_argv, pass_through, should_capture, Capture, Invocation},
    init::{flags::CommandLine, istio::IstioArgs},
};

fuzz_target!(|data: &[u8]| {
    // CNI_ARGS first (up to a NUL), the configuration after it.
    let (cni_args, stdin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let cni_args = String::from_utf8_lossy(cni_args).into_owned();
    let inv = Invocation::from_env(|name| match name {
        "CNI_COMMAND" => Some("ADD".to_string()),
        "CNI_ARGS" => Some(cni_args.clone()),
        _ => None,
    })
    .expect("CNI_COMMAND is set");
    let Ok(conf) = decode_conf(stdin) else {
        return;
    };
    if let Ok(out) = pass_through(&conf) {
        let prev = conf.prev_result.as_ref().expect("passed on");
        for key in ["interfaces", "ips", "routes", "dns"] {
            assert_eq!(out.get(key), prev.get(key), "prevResult's {key} changed");
        }
    }
    if should_capture(&conf, &inv) == Capture::Yes {
        let ann = conf
            .runtime_config
            .pod_annotations
            .clone()
            .unwrap_or_default();
        let mut argv = vec!["istio-iptables".to_string()];
        argv.extend(istio_argv(&ann));
        let _ = IstioArgs::parse_argv(argv);
    }
});
