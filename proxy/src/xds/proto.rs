//! Reading Envoy's protobuf types: `Any` payloads, durations, integers, fractions, addresses.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::{
    envoy::{
        config::core::v3 as core,
        r#type::v3::{fractional_percent::DenominatorType, FractionalPercent},
    },
    google::protobuf::{Any, Duration, UInt32Value},
};
use prost::{Message, Name};

use super::error::Problem;

/// `any` as an `M`, or `None` when it holds another type.
pub fn unpack<M: Message + Name + Default>(any: &Any) -> Result<Option<M>, Problem> {
    if any.type_url != M::type_url() {
        return Ok(None);
    }
    M::decode(any.value.as_slice())
        .map(Some)
        .map_err(|error| Problem::Undecodable {
            message: M::full_name(),
            error,
        })
}

/// A duration in milliseconds (negative parts count as 0).
pub fn ms(d: &Option<Duration>) -> Option<u64> {
    d.as_ref()
        .map(|d| d.seconds.max(0) as u64 * 1000 + d.nanos.max(0) as u64 / 1_000_000)
}

pub fn u32v(v: &Option<UInt32Value>) -> Option<u32> {
    v.as_ref().map(|v| v.value)
}

/// A fractional percent as a percentage (0 to 100); none is 100.
pub fn percent(f: &Option<FractionalPercent>) -> f64 {
    let Some(f) = f else { return 100.0 };
    let denominator = match DenominatorType::try_from(f.denominator) {
        Ok(DenominatorType::TenThousand) => 10_000.0,
        Ok(DenominatorType::Million) => 1_000_000.0,
        Ok(DenominatorType::Hundred) | Err(_) => 100.0,
    };
    (f.numerator as f64 / denominator * 100.0).min(100.0)
}

/// A `socket_address` with an IP address (names are not resolved) and a port.
pub fn socket_addr(a: &Option<core::Address>) -> Result<SocketAddr, Problem> {
    use core::{address::Address, socket_address::PortSpecifier};
    let Some(Address::SocketAddress(sa)) = a.as_ref().and_then(|a| a.address.as_ref()) else {
        return Err(Problem::Missing("a socket_address"));
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| Problem::NotAnIp(sa.address.clone()))?;
    match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) if p <= 65535 => Ok(SocketAddr::new(ip, p as u16)),
        _ => Err(Problem::Missing("a port_value of 0 to 65535")),
    }
}
