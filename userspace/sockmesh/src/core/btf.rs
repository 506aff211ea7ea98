//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where a struct member
//! lives: the acceleration programs read a few fields of `struct sock`, `struct sk_psock` and
//! `struct tcp_sock` (see [`KernelOffsets`]) whose places change between kernels. The format is the kernel's
//! Documentation/bpf/btf.rst: a header, a type section, a string section.

use std::path::{Path, PathBuf};

use sockmesh_common::{CredOffsets, KernelOffsets};

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Why a member's offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF, or cut short: {0}")]
    Malformed(&'static str),
    #[error("the kernel has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
}

/// Parsed sections of a little-endian BTF blob.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let short = BtfError::Malformed;
        let magic = data.get(0..2).ok_or(short("header"))?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(short("magic"));
        }
        let hdr_len = u32_at(data, 4).ok_or(short("header"))? as usize;
        let field = |at| u32_at(data, at).map(|v| v as usize).ok_or(short("header"));
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let section = |off: usize, len: usize, what| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(short(what))
        };
        Ok(Btf {
            types: section(type_off, type_len, "type section")?,
            strings: section(str_off, str_len, "string section")?,
        })
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Byte offset of `member` in `struct strukt` (the first struct of that name).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let t = self.types;
        let mut at = 0;
        while at < t.len() {
            let (name, info) = (
                u32_at(t, at).ok_or(BtfError::Malformed("type"))?,
                u32_at(t, at + 4).ok_or(BtfError::Malformed("type"))?,
            );
            let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, info & 0xffff, info >> 31);
            let members = at + 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, modifiers, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed("unknown type kind")),
            } as usize;
            if kind == KIND_STRUCT && self.name(name) == strukt.as_bytes() {
                for m in 0..vlen as usize {
                    let m_at = members + 12 * m;
                    let m_name = u32_at(t, m_at).ok_or(BtfError::Malformed("member"))?;
                    let bits = u32_at(t, m_at + 8).ok_or(BtfError::Malformed("member"))?;
                    if self.name(m_name) == member.as_bytes() {
                        // With kind_flag set, the low 24 bits are the bit offset.
                        let bits = if kind_flag == 1 {
                            bits & 0xff_ffff
                        } else {
                            bits
                        };
                        return Ok(bits / 8);
                    }
                }
                return Err(BtfError::NoMember {
                    strukt: strukt.into(),
                    member: member.into(),
                });
            }
            at = members + extra;
        }
        Err(BtfError::NoStruct(strukt.into()))
    }
}

/// Where the running kernel shows its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's BTF at `path`, read once for every offset the programs need.
pub fn read(path: &Path) -> Result<Vec<u8>, BtfError> {
    std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The kernel's offsets of the fields that lead from a socket to its creator's credentials,
/// from its BTF (`data`, as [`read`] gives it).
pub fn cred_offsets(data: &[u8]) -> Result<CredOffsets, BtfError> {
    let btf = Btf::parse(data)?;
    let cred = |member| btf.member_offset("cred", member);
    Ok(CredOffsets {
        sk_socket: btf.member_offset("sock", "sk_socket")?,
        socket_file: btf.member_offset("socket", "file")?,
        file_cred: btf.member_offset("file", "f_cred")?,
        cred_fsuid: cred("fsuid")?,
        cred_fsgid: cred("fsgid")?,
    })
}

/// The kernel's offsets of the fields the acceleration programs read, from its BTF (`data`, as
/// [`read`] gives it).
pub fn kernel_offsets(data: &[u8]) -> Result<KernelOffsets, BtfError> {
    let btf = Btf::parse(data)?;
    let tcp = |member| btf.member_offset("tcp_sock", member);
    Ok(KernelOffsets {
        sk_user_data: btf.member_offset("sock", "sk_user_data")?,
        psock_msg_tot_len: btf.member_offset("sk_psock", "msg_tot_len")?,
        tcp_write_seq: tcp("write_seq")?,
        tcp_snd_una: tcp("snd_una")?,
        tcp_rcv_nxt: tcp("rcv_nxt")?,
        tcp_copied_seq: tcp("copied_seq")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` and `struct pair { int a; int b; }` (b at byte 4), and a
    /// kind_flag struct `bits { int x:3 at bit 64 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0pair\0a\0b\0bits\0x\0".to_vec();
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            let w = needle.as_bytes();
            (strings.windows(w.len()).position(|x| x == w).unwrap() + 1) as u32
        };
        let mut types = Vec::new();
        let mut put = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] INT "int" size 4, encoding word.
        put(name("int"));
        put(1 << 24);
        put(4);
        put(32);
        // [2] STRUCT "pair", 2 members, size 8.
        put(name("pair"));
        put((KIND_STRUCT << 24) | 2);
        put(8);
        for (m, off) in [("a", 0), ("b", 32)] {
            put(name(m));
            put(1);
            put(off);
        }
        // [3] STRUCT "bits", kind_flag, 1 member at bit 64 with bitfield size 3.
        put(name("bits"));
        put((1 << 31) | (KIND_STRUCT << 24) | 1);
        put(16);
        put(name("x"));
        put(1);
        put((3 << 24) | 64);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]); // version, flags
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn member_offsets_are_found_by_struct_and_name() {
        let data = blob();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.member_offset("pair", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("pair", "b").unwrap(), 4);
        assert_eq!(btf.member_offset("bits", "x").unwrap(), 8);
        assert!(matches!(
            btf.member_offset("pair", "c"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(Btf::parse(&data[..10]).is_err());
        assert!(Btf::parse(b"not btf at all, not btf at all").is_err());
    }

    /// The running kernel's BTF has the fields that lead to a socket's creator.
    #[test]
    fn the_running_kernel_has_the_fields_to_a_sockets_creator() {
        let off = cred_offsets(&read(Path::new(VMLINUX)).unwrap()).expect("kernel BTF");
        assert!(off.known(), "{off:?}");
        assert_eq!(off.cred_fsgid, off.cred_fsuid + 4, "{off:?}");
    }

    /// The running kernel's BTF parses and has the fields acceleration reads
    /// (the machines sockmesh is built and tested on expose it).
    #[test]
    fn the_running_kernel_has_the_fields_acceleration_reads() {
        let off = kernel_offsets(&read(Path::new(VMLINUX)).unwrap()).expect("kernel BTF");
        assert!(off.known(), "{off:?}");
    }
}
