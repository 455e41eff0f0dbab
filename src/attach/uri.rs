//! Attachment URIs (SPEC §7): where the bytes of an attachment or a DLPack tensor live.
//!
//! Three schemes, each with the required `#<offset>,<size>` (decimal bytes):
//!
//! | scheme | form |
//! |---|---|
//! | `shm` | `shm://<name>#<off>,<size>`, `<name>` is `[A-Za-z0-9._-]{1,200}` |
//! | `memfd` | `memfd://<index>#<off>,<size>`, `<index>` a decimal `u32` |
//! | `cuda-ipc` | `cuda-ipc://<device-uuid>/<128 hex>[?event=<128 hex>]#<off>,<size>` |
//! | `local` | `local://<id>#<off>,<size>`, `<id>` a decimal `u64`: an object registered in this process (not a SPEC scheme: [`LocalScheme`](super::scheme::LocalScheme), for tests; never offered to a peer) |
//!
//! Decisions where the SPEC leaves room:
//!
//! - **Where `?event=` goes.** SPEC §7 writes the `cuda-ipc` form with `#<off>,<size>` and then
//!   says "optional `?event=<128 hex>`" without placing it. In every URI (RFC 3986) the query
//!   comes before the fragment, and a generic URI parser would otherwise read the event as part
//!   of the fragment, so [`AttachmentUri`]'s `Display` writes `…/<handle>?event=<hex>#<off>,<size>`.
//!   [`AttachmentUri::parse`] also accepts the event after the fragment
//!   (`…#<off>,<size>?event=<hex>`), the literal reading of the SPEC's table, and means the same
//!   thing by it.
//! - **`<device-uuid>`** is the 16-byte CUDA device UUID. It is accepted as 32 hex digits, or in
//!   the dashed 8-4-4-4-12 form, with or without the `GPU-` prefix that `nvidia-smi -L` prints;
//!   it is written as `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower case.
//! - **Hex** is accepted in either case and written in lower case.
//! - **Names** `.` and `..` match the SPEC's character class but would resolve to a directory
//!   under `/dev/shm`, so they are refused.
//! - **Numbers** are plain ASCII digits (no sign, no spaces); `offset + size` must not overflow
//!   `u64`. Whether the region fits the object, and whether the name carries the peer's
//!   `shm_prefix`, is checked when the object is mapped, not here.
//!
//! Every error is `ERR_ATTACHMENT` with a message that names the problem.
//!
//! ```
//! use xcp::attach::uri::{AttachmentUri, Target};
//! use xcp::ErrorCode;
//!
//! let uri = AttachmentUri::parse("memfd://2#0,65536")?;
//! assert_eq!(uri.target(), &Target::Memfd { index: 2 });
//! assert_eq!(uri.scheme(), "memfd");
//!
//! let shm = AttachmentUri::shm("xcp-1f.seg3", 128, 64)?;
//! assert_eq!(shm.to_string(), "shm://xcp-1f.seg3#128,64");
//! assert_eq!(AttachmentUri::parse(&shm.to_string())?, shm);
//!
//! let err = AttachmentUri::parse("shm://bad/name#0,1").unwrap_err();
//! assert_eq!(err.code(), ErrorCode::ERR_ATTACHMENT);
//! # Ok::<(), xcp::Error>(())
//! ```

use std::fmt;

use crate::error::{Error, Result};

/// The longest `shm` object name (SPEC §7).
pub const MAX_SHM_NAME: usize = 200;

/// What an [`AttachmentUri`] points at, by scheme.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A POSIX shared-memory object `/<name>` on the same host.
    Shm {
        /// The object name without the leading `/`: `[A-Za-z0-9._-]{1,200}`, not `.` or `..`.
        name: String,
    },
    /// The `index`-th file descriptor passed with the frame by `SCM_RIGHTS`.
    Memfd {
        /// Position of the descriptor in the frame's `SCM_RIGHTS` list.
        index: u32,
    },
    /// A CUDA IPC memory handle of an allocation's base on one device.
    CudaIpc {
        /// The CUDA device UUID.
        device_uuid: [u8; 16],
        /// The `cudaIpcMemHandle_t` bytes.
        mem_handle: [u8; 64],
        /// The `cudaIpcEventHandle_t` the producer recorded after writing, if any.
        event: Option<[u8; 64]>,
    },
    /// An object registered with this process's [`LocalScheme`](super::scheme::LocalScheme)
    /// (in-process, for tests; never negotiated with a peer).
    Local {
        /// The registration id.
        id: u64,
    },
}

/// A parsed, validated attachment URI: a [`Target`] and the region `[offset, offset + size)`
/// inside it. Build one with [`AttachmentUri::parse`] or the constructors; `Display` writes the
/// canonical form, and `parse` of that text gives back an equal value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AttachmentUri {
    target: Target,
    offset: u64,
    size: u64,
}

fn attach_err(detail: impl fmt::Display) -> Error {
    Error::attachment(format!("attachment uri: {detail}"))
}

impl AttachmentUri {
    /// A URI for `target` and the region `[offset, offset + size)`; checks the target's rules
    /// (the `shm` name) and that `offset + size` fits in `u64`.
    pub fn new(target: Target, offset: u64, size: u64) -> Result<Self> {
        if let Target::Shm { name } = &target {
            check_shm_name(name)?;
        }
        if offset.checked_add(size).is_none() {
            return Err(attach_err(format!(
                "offset {offset} + size {size} overflows u64"
            )));
        }
        Ok(AttachmentUri {
            target,
            offset,
            size,
        })
    }

    /// `shm://<name>#<offset>,<size>`.
    pub fn shm(name: impl Into<String>, offset: u64, size: u64) -> Result<Self> {
        Self::new(Target::Shm { name: name.into() }, offset, size)
    }

    /// `memfd://<index>#<offset>,<size>`.
    pub fn memfd(index: u32, offset: u64, size: u64) -> Result<Self> {
        Self::new(Target::Memfd { index }, offset, size)
    }

    /// `cuda-ipc://<device-uuid>/<handle>[?event=<event>]#<offset>,<size>`.
    pub fn cuda_ipc(
        device_uuid: [u8; 16],
        mem_handle: [u8; 64],
        event: Option<[u8; 64]>,
        offset: u64,
        size: u64,
    ) -> Result<Self> {
        Self::new(
            Target::CudaIpc {
                device_uuid,
                mem_handle,
                event,
            },
            offset,
            size,
        )
    }

    /// What the URI points at.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The first byte of the region inside the target.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The length of the region in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `offset + size`, the end of the region (never overflows: checked on construction).
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }

    /// The scheme name: `shm`, `memfd`, `cuda-ipc` or `local`.
    pub fn scheme(&self) -> &'static str {
        self.scheme_id().name()
    }

    /// The scheme, as the enum sessions negotiate.
    pub fn scheme_id(&self) -> super::Scheme {
        use super::Scheme;
        match self.target {
            Target::Shm { .. } => Scheme::Shm,
            Target::Memfd { .. } => Scheme::Memfd,
            Target::CudaIpc { .. } => Scheme::CudaIpc,
            Target::Local { .. } => Scheme::Local,
        }
    }

    /// Parses and validates a URI. Errors are `ERR_ATTACHMENT` naming the problem; nothing is
    /// allocated beyond the result.
    pub fn parse(s: &str) -> Result<Self> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| attach_err("no scheme (expected shm://, memfd:// or cuda-ipc://)"))?;
        let (before, fragment) = rest
            .split_once('#')
            .ok_or_else(|| attach_err("missing #<offset>,<size>"))?;
        if fragment.contains('#') {
            return Err(attach_err("more than one '#'"));
        }
        // The query may sit before the fragment (canonical) or after it (SPEC table order).
        let (before, query_before) = split_query(before);
        let (region, query_after) = split_query(fragment);
        let query = match (query_before, query_after) {
            (Some(_), Some(_)) => return Err(attach_err("more than one query")),
            (q, None) | (None, q) => q,
        };
        let (off, size) = region
            .split_once(',')
            .ok_or_else(|| attach_err("fragment must be #<offset>,<size>"))?;
        let offset = parse_decimal(off, "offset")?;
        let size = parse_decimal(size, "size")?;

        let target = match scheme {
            "shm" => {
                no_query(query, scheme)?;
                Target::Shm {
                    name: before.to_owned(),
                }
            }
            "memfd" => {
                no_query(query, scheme)?;
                let index = parse_decimal(before, "memfd index")?;
                let index = u32::try_from(index)
                    .map_err(|_| attach_err(format!("memfd index {index} exceeds u32")))?;
                Target::Memfd { index }
            }
            "cuda-ipc" => {
                let (uuid, handle) = before
                    .split_once('/')
                    .ok_or_else(|| attach_err("cuda-ipc needs <device-uuid>/<handle>"))?;
                let device_uuid = parse_uuid(uuid)?;
                let mem_handle = parse_hex64(handle, "cuda-ipc handle")?;
                let event = match query {
                    None => None,
                    Some(q) => {
                        let hex = q.strip_prefix("event=").ok_or_else(|| {
                            attach_err(format!("unknown cuda-ipc query {q:?} (expected event=)"))
                        })?;
                        Some(parse_hex64(hex, "cuda-ipc event")?)
                    }
                };
                Target::CudaIpc {
                    device_uuid,
                    mem_handle,
                    event,
                }
            }
            "local" => {
                no_query(query, scheme)?;
                Target::Local {
                    id: parse_decimal(before, "local id")?,
                }
            }
            other => {
                return Err(attach_err(format!(
                    "unknown scheme {other:?} (expected shm, memfd or cuda-ipc)"
                )))
            }
        };
        Self::new(target, offset, size)
    }
}

impl fmt::Display for AttachmentUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Shm { name } => write!(f, "shm://{name}")?,
            Target::Memfd { index } => write!(f, "memfd://{index}")?,
            Target::Local { id } => write!(f, "local://{id}")?,
            Target::CudaIpc {
                device_uuid,
                mem_handle,
                event,
            } => {
                let u = device_uuid;
                write!(
                    f,
                    "cuda-ipc://GPU-{}-{}-{}-{}-{}/{}",
                    Hex(&u[0..4]),
                    Hex(&u[4..6]),
                    Hex(&u[6..8]),
                    Hex(&u[8..10]),
                    Hex(&u[10..16]),
                    Hex(mem_handle)
                )?;
                if let Some(ev) = event {
                    write!(f, "?event={}", Hex(ev))?;
                }
            }
        }
        write!(f, "#{},{}", self.offset, self.size)
    }
}

impl std::str::FromStr for AttachmentUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Lower-case hex of a byte slice.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

fn split_query(s: &str) -> (&str, Option<&str>) {
    match s.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (s, None),
    }
}

fn no_query(query: Option<&str>, scheme: &str) -> Result<()> {
    match query {
        None => Ok(()),
        Some(q) => Err(attach_err(format!("{scheme}:// takes no query, got {q:?}"))),
    }
}

fn check_shm_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_SHM_NAME {
        return Err(attach_err(format!(
            "shm name must be 1..={MAX_SHM_NAME} characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(attach_err(format!(
            "shm name has {c:?}; only [A-Za-z0-9._-] are allowed"
        )));
    }
    if name == "." || name == ".." {
        return Err(attach_err(format!("shm name {name:?} is a directory")));
    }
    Ok(())
}

fn parse_decimal(s: &str, what: &str) -> Result<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(attach_err(format!("{what} {s:?} is not a decimal number")));
    }
    s.parse::<u64>()
        .map_err(|_| attach_err(format!("{what} {s:?} exceeds u64")))
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Exactly `N * 2` hex digits into `N` bytes.
fn parse_hex<const N: usize>(s: &str, what: &str) -> Result<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return Err(attach_err(format!(
            "{what} must be {} hex digits, got {} characters",
            N * 2,
            b.len()
        )));
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        match (hex_val(pair[0]), hex_val(pair[1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return Err(attach_err(format!("{what} is not hex"))),
        }
    }
    Ok(out)
}

fn parse_hex64(s: &str, what: &str) -> Result<[u8; 64]> {
    parse_hex::<64>(s, what)
}

/// A CUDA device UUID: 32 hex digits, or the 8-4-4-4-12 dashed form, either with an optional
/// `GPU-` prefix.
fn parse_uuid(s: &str) -> Result<[u8; 16]> {
    let body = s.strip_prefix("GPU-").unwrap_or(s);
    let b = body.as_bytes();
    let dashed = b.len() == 36 && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-');
    let mut digits = [0u8; 32];
    let mut n = 0;
    for (i, &c) in b.iter().enumerate() {
        if dashed && matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        if n == 32 {
            n += 1;
            break;
        }
        digits[n] = c;
        n += 1;
    }
    if n != 32 {
        return Err(attach_err(format!(
            "device uuid {s:?} must be 32 hex digits (optionally GPU- and 8-4-4-4-12 dashes)"
        )));
    }
    // The digits are ASCII here only if they are hex; parse_hex checks that.
    let text = std::str::from_utf8(&digits).map_err(|_| attach_err("device uuid is not hex"))?;
    parse_hex::<16>(text, "device uuid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;

    fn code(s: &str) -> String {
        let e = AttachmentUri::parse(s).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT, "{s}: {e}");
        e.to_string()
    }

    #[test]
    fn parses_each_scheme() {
        let u = AttachmentUri::parse("shm://A-z_0.9#0,0").unwrap();
        assert_eq!(
            u.target(),
            &Target::Shm {
                name: "A-z_0.9".into()
            }
        );
        assert_eq!((u.offset(), u.size()), (0, 0));

        let u = AttachmentUri::parse("memfd://4294967295#1,2").unwrap();
        assert_eq!(u.target(), &Target::Memfd { index: u32::MAX });

        let h = "ab".repeat(64);
        let e = "0C".repeat(64);
        let canonical = format!(
            "cuda-ipc://GPU-00112233-4455-6677-8899-aabbccddeeff/{h}?event={}#10,20",
            e.to_lowercase()
        );
        let u = AttachmentUri::parse(&canonical).unwrap();
        let want_uuid = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(
            u.target(),
            &Target::CudaIpc {
                device_uuid: want_uuid,
                mem_handle: [0xab; 64],
                event: Some([0x0c; 64]),
            }
        );
        assert_eq!(u.to_string(), canonical);
        // The other accepted spellings mean the same URI.
        for alt in [
            format!("cuda-ipc://00112233445566778899AABBCCDDEEFF/{h}#10,20?event={e}"),
            format!("cuda-ipc://00112233-4455-6677-8899-aabbccddeeff/{h}?event={e}#10,20"),
        ] {
            assert_eq!(AttachmentUri::parse(&alt).unwrap(), u, "{alt}");
        }
        let no_event = AttachmentUri::parse(&format!(
            "cuda-ipc://00112233445566778899aabbccddeeff/{h}#0,1"
        ))
        .unwrap();
        assert!(matches!(
            no_event.target(),
            Target::CudaIpc { event: None, .. }
        ));
    }

    #[test]
    fn refuses_bad_uris() {
        let h = "00".repeat(64);
        let uuid = "00".repeat(16);
        let cases: Vec<(String, &str)> = vec![
            ("shm://seg".into(), "missing #"),
            ("seg#0,1".into(), "no scheme"),
            ("http://seg#0,1".into(), "unknown scheme"),
            ("shm://#0,1".into(), "1..=200"),
            (format!("shm://{}#0,1", "a".repeat(201)), "1..=200"),
            ("shm://a/b#0,1".into(), "'/'"),
            ("shm://..#0,1".into(), "directory"),
            ("shm://a#0".into(), "#<offset>,<size>"),
            ("shm://a#,1".into(), "offset"),
            ("shm://a#+1,1".into(), "offset"),
            ("shm://a#1,-1".into(), "size"),
            ("shm://a#0,18446744073709551616".into(), "exceeds u64"),
            ("shm://a#18446744073709551615,1".into(), "overflows"),
            ("shm://a#0,1#2".into(), "more than one '#'"),
            ("shm://a?x=1#0,1".into(), "takes no query"),
            ("memfd://x#0,1".into(), "memfd index"),
            ("memfd://4294967296#0,1".into(), "exceeds u32"),
            (format!("cuda-ipc://{uuid}#0,1"), "<device-uuid>/<handle>"),
            (format!("cuda-ipc://{uuid}0/{h}#0,1"), "device uuid"),
            (format!("cuda-ipc://zz{}/{h}#0,1", &uuid[2..]), "not hex"),
            (
                format!("cuda-ipc://{uuid}/{}#0,1", &h[2..]),
                "128 hex digits",
            ),
            (format!("cuda-ipc://{uuid}/{h}?evt={h}#0,1"), "query"),
            (
                format!("cuda-ipc://{uuid}/{h}?event=1#0,1"),
                "cuda-ipc event",
            ),
            (
                format!("cuda-ipc://{uuid}/{h}?event={h}#0,1?event={h}"),
                "more than one query",
            ),
        ];
        for (uri, needle) in cases {
            let msg = code(&uri);
            assert!(msg.contains(needle), "{uri}: {msg:?} lacks {needle:?}");
        }
    }

    fn arb_uri() -> impl Strategy<Value = AttachmentUri> {
        let region = (any::<u64>(), any::<u64>()).prop_map(|(a, b)| {
            let off = a;
            let size = b.min(u64::MAX - off);
            (off, size)
        });
        let target = prop_oneof![
            "[A-Za-z0-9._-]{1,200}"
                .prop_filter("not a directory", |n| n != "." && n != "..")
                .prop_map(|name| Target::Shm { name }),
            any::<u32>().prop_map(|index| Target::Memfd { index }),
            any::<u64>().prop_map(|id| Target::Local { id }),
            (
                any::<[u8; 16]>(),
                prop::collection::vec(any::<u8>(), 64),
                prop::option::of(prop::collection::vec(any::<u8>(), 64)),
            )
                .prop_map(|(device_uuid, h, ev)| Target::CudaIpc {
                    device_uuid,
                    mem_handle: h.try_into().unwrap(),
                    event: ev.map(|e| e.try_into().unwrap()),
                }),
        ];
        (target, region).prop_map(|(t, (off, size))| AttachmentUri::new(t, off, size).unwrap())
    }

    proptest! {
        #[test]
        fn display_round_trips(u in arb_uri()) {
            let text = u.to_string();
            prop_assert_eq!(AttachmentUri::parse(&text).unwrap(), u);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            if let Err(e) = AttachmentUri::parse(&s) {
                prop_assert_eq!(e.code(), ErrorCode::ERR_ATTACHMENT);
            }
        }

        #[test]
        fn near_miss_strings_never_panic(
            scheme in prop_oneof![Just("shm"), Just("memfd"), Just("cuda-ipc")],
            rest in "[0-9a-fA-FGPU/#,?=.-]{0,300}",
        ) {
            let _ = AttachmentUri::parse(&format!("{scheme}://{rest}"));
        }
    }
}
