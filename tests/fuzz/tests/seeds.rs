//! The committed seeds are the ones `seeds::all` makes, and each is accepted by its parser.
//! `SOCKMESH_WRITE_SEEDS=1` writes them instead of comparing.

use std::{collections::BTreeSet, path::PathBuf};

use prost::Message;
use sockmesh_fuzz::{seeds, Invocation};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

#[test]
fn committed_seeds_are_current() {
    let write = std::env::var_os("SOCKMESH_WRITE_SEEDS").is_some();
    for s in seeds::all() {
        let path = dir().join(s.target).join(&s.name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &s.bytes).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (SOCKMESH_WRITE_SEEDS=1 writes it)", path.display())
            });
            assert_eq!(committed, s.bytes, "{} is stale", path.display());
        }
    }
}

#[test]
fn each_seed_is_accepted() {
    use sockmesh::init::{
        flags::CommandLine,
        istio::{IfAddr, IstioArgs},
        linkerd::LinkerdArgs,
    };
    let addrs = [IfAddr {
        ip: "10.244.0.5".parse().unwrap(),
    }];
    let mut targets = BTreeSet::new();
    for s in seeds::all() {
        targets.insert(s.target);
        let what = format!("{}/{}", s.target, s.name);
        match s.target {
            "istio_flags" => {
                let inv = Invocation::from_bytes("istio-iptables", &s.bytes);
                let a = IstioArgs::parse_argv(inv.argv.clone()).expect(&what);
                a.to_spec(&inv, &addrs).expect(&what);
            }
            "linkerd_flags" => {
                let inv = Invocation::from_bytes("proxy-init", &s.bytes);
                LinkerdArgs::parse_argv(inv.argv)
                    .expect(&what)
                    .to_spec()
                    .expect(&what);
            }
            "cni_input" => {
                let conf = &s.bytes[s.bytes.iter().position(|&b| b == 0).unwrap() + 1..];
                let conf = sockmesh::cni::plugin::decode_conf(conf).expect(&what);
                sockmesh::cni::plugin::pass_through(&conf).expect(&what);
            }
            "agent_api" => {
                let settings = sockmesh_api::pb::PodSettings::decode(&s.bytes[..]).expect(&what);
                let spec = sockmesh::core::spec::PodSpec::try_from(settings).expect(&what);
                spec.validate().expect(&what);
            }
            "proxy_config" => {
                let text = std::str::from_utf8(&s.bytes).unwrap();
                sockmesh_proxy::config::Config::parse(&what, text).expect(&what);
            }
            "xds_resources" => {
                use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
                use sockmesh_proxy::xds::{Kind, Resources};
                let r = DiscoveryResponse::decode(&s.bytes[..]).expect(&what);
                let kind = Kind::of(&r.type_url).expect(&what);
                let wanted = BTreeSet::from(["ratings".to_string(), "80".to_string()]);
                let mut res = Resources::default();
                res.take(kind, &r.resources, &wanted).expect(&what);
                assert!(!res.is_empty(), "{what}: nothing taken");
                let file = sockmesh_proxy::config::Config::parse("f", "listeners: []\n").unwrap();
                sockmesh_proxy::xds::merge(&file, &res).expect(&what);
            }
            "first_bytes" => {
                assert!(
                    sockmesh_proxy::transport::detect_partial(&s.bytes).is_some(),
                    "{what}"
                );
            }
            other => panic!("seed for unknown target {other}"),
        }
    }
    assert_eq!(targets.len(), 7, "every target has seeds: {targets:?}");
}
