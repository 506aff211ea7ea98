//! sockmesh-proxy's YAML configuration: any text either is refused with the field named, or
//! validates and translates into the routes and clusters connections use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockmesh_proxy::{config::Config, snapshot::Snapshot};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse("fuzz.yaml", text) else {
        return;
    };
    config
        .validate_merged()
        .expect("a file that validates also validates as merged");
    let snapshot = Snapshot::new(&config, None);
    assert_eq!(snapshot.clusters.len(), config.clusters.len());
    let again = Snapshot::new(&config, Some(&snapshot));
    assert_eq!(again.clusters.len(), config.clusters.len());
});
