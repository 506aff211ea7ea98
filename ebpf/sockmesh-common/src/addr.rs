//! Addresses as the kernel programs and the maps hold them: IPv6 form, IPv4 v4-mapped.

/// An address in IPv6 form, network byte order. IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), so
/// one key layout serves both families and a dual-stack socket dialing `::ffff:a.b.c.d` needs no
/// special case.
pub type Addr = [u8; 16];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `::1`.
pub const V6_LOOPBACK: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// 127.0.0.1.
pub const V4_LOOPBACK: [u8; 4] = [127, 0, 0, 1];
/// Envoy's inbound passthrough source, IPv4: `127.0.0.6`.
pub const V4_INBOUND_PASSTHROUGH: [u8; 4] = [127, 0, 0, 6];
/// Envoy's inbound passthrough source, IPv6: `::6`.
pub const V6_INBOUND_PASSTHROUGH: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// The key under which `SM_ADDR_POD` names the pod that owns a `-k` interface: tc cannot read
/// the netns cookie of a packet that has no socket yet, so the tc program finds the pod by the
/// interface's index and MAC address (the destination MAC of a frame routed through the pod).
/// `ff53:6d6b:IIII:IIII:MMMM:MMMM:MMMM:0`, an IPv6 multicast form no pod address can take.
pub const fn forward_key(ifindex: u32, mac: [u8; 6]) -> Addr {
    let i = ifindex.to_be_bytes();
    [
        0xff, 0x53, 0x6d, 0x6b, i[0], i[1], i[2], i[3], mac[0], mac[1], mac[2], mac[3], mac[4],
        mac[5], 0, 0,
    ]
}

/// `::ffff:a.b.c.d` from four octets.
pub const fn v4_mapped(o: [u8; 4]) -> Addr {
    from_words([
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(o),
    ])
}

/// An address from four 32-bit words, in memory order. Built so, an address's zeroes are
/// stored a word at a time: byte by byte, the kernel programs' compiler zeroes them through
/// its `memset`, a call and a loop of one byte per turn.
pub const fn from_words(w: [u32; 4]) -> Addr {
    // SAFETY: 16 bytes either way, and every bit pattern is a valid `[u8; 16]`.
    unsafe { core::mem::transmute::<[u32; 4], Addr>(w) }
}

pub const fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

pub const fn v4_octets(a: &Addr) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Byte-wise equality that stays a plain loop in the kernel (no `memcmp` call).
#[inline(always)]
pub const fn addr_eq(a: &Addr, b: &Addr) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `a` is a loopback address (127.0.0.0/8 v4-mapped, or ::1).
pub const fn is_loopback(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        return a[12] == 127;
    }
    addr_eq(a, &V6_LOOPBACK)
}

/// All zeroes, or v4-mapped 0.0.0.0: an unbound socket's address, or a connect to "any".
pub const fn is_unspecified(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        return a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 0;
    }
    addr_eq(a, &[0; 16])
}

/// Whether `src` is Envoy's inbound passthrough source (127.0.0.6 or ::6): the proxy's
/// connections to the app on the pod's own address, which istio's rule 2 leaves alone.
pub const fn is_inbound_passthrough(src: &Addr) -> bool {
    if is_v4_mapped(src) {
        let o = v4_octets(src);
        o[0] == V4_INBOUND_PASSTHROUGH[0]
            && o[1] == V4_INBOUND_PASSTHROUGH[1]
            && o[2] == V4_INBOUND_PASSTHROUGH[2]
            && o[3] == V4_INBOUND_PASSTHROUGH[3]
    } else {
        addr_eq(src, &V6_INBOUND_PASSTHROUGH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_127_slash_8_and_the_v6_one() {
        assert!(is_loopback(&v4_mapped(V4_LOOPBACK)));
        assert!(is_loopback(&v4_mapped([127, 9, 9, 6])) && is_loopback(&V6_LOOPBACK));
        assert!(!is_loopback(&v4_mapped([10, 0, 0, 5])) && !is_loopback(&[0; 16]));
    }

    #[test]
    fn unspecified_is_either_family_s_any() {
        assert!(is_unspecified(&[0; 16]) && is_unspecified(&v4_mapped([0; 4])));
        assert!(!is_unspecified(&V6_LOOPBACK) && !is_unspecified(&v4_mapped([0, 0, 0, 1])));
    }

    #[test]
    fn passthrough_source_in_both_families() {
        assert!(is_inbound_passthrough(&v4_mapped([127, 0, 0, 6])));
        assert!(is_inbound_passthrough(&V6_INBOUND_PASSTHROUGH));
        assert!(!is_inbound_passthrough(&v4_mapped([127, 0, 0, 1])));
        assert!(!is_inbound_passthrough(&v4_mapped([0, 0, 0, 6])));
    }
}
