//! The agent's registration API: any PodSettings message either is refused with the field named
//! or gives a spec that, sent again, decodes to the same spec; and the connection preamble
//! (one byte and at most one fd) is read from any bytes without a panic.
#![no_main]

use std::{
    io::Write,
    os::{fd::AsFd, unix::net::UnixStream},
};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sockmesh::core::spec::PodSpec;
use sockmesh_api::{pb, recv_preamble};

fuzz_target!(|data: &[u8]| {
    if let Ok(settings) = pb::PodSettings::decode(data) {
        if let Ok(spec) = PodSpec::try_from(settings) {
            if spec.validate().is_ok() {
                let again = PodSpec::try_from(pb::PodSettings::from(&spec))
                    .expect("an accepted spec decodes from its own settings");
                assert_eq!(again, spec);
            }
        }
    }
    let (mut a, b) = UnixStream::pair().expect("socketpair");
    b.set_nonblocking(true).expect("non-blocking");
    if !data.is_empty() {
        a.write_all(data).expect("write");
    }
    drop(a);
    let p = recv_preamble(b.as_fd()).expect("a preamble or its absence");
    assert_eq!(p.byte, data.first().copied());
    assert!(p.fd.is_none());
});
