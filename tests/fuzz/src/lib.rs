//! What the fuzz targets share: how a byte string becomes a command line and an environment.

use std::collections::BTreeMap;

/// An init container's input from fuzzed bytes: NUL-separated words; a word `@NAME=value` is an
/// environment variable, any other word an argument (after argv[0], which is supplied).
pub struct Invocation {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl Invocation {
    pub fn from_bytes(argv0: &str, data: &[u8]) -> Invocation {
        let mut argv = vec![argv0.to_string()];
        let mut env = BTreeMap::new();
        for word in data.split(|&b| b == 0) {
            let word = String::from_utf8_lossy(word).into_owned();
            match word.strip_prefix('@').and_then(|kv| kv.split_once('=')) {
                Some((k, v)) => {
                    env.insert(k.to_string(), v.to_string());
                }
                None => argv.push(word),
            }
        }
        Invocation { argv, env }
    }
}

/// The environment `init` reads (istio's env-only settings) is the invocation's.
impl sockmesh::init::flags::Env for Invocation {
    fn var(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
}

pub mod seeds;
