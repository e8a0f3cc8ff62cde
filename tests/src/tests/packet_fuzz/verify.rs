//! What a fuzzed packet's output may look like: an independent, total
//! (never panicking) parser of whatever bytes went in, the byte ranges a
//! translation may change in them, and the checksum test that tells a
//! consistent translation from a half-rewritten one.
//!
//! The checksum test is incremental, like the translation: for every
//! checksum the packet carries, the ones'-complement sum over the bytes it
//! covers (checksum field and pseudo-header included) must be the same before
//! and after. A valid checksum (sum 0xffff) thus stays valid, and a wrong
//! one stays wrong by exactly the same amount. Only the words that changed
//! count, so the covered region may extend to the end of the frame.

use std::net::IpAddr;

pub const ETH_LEN: usize = 14;
pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;

/// Ones'-complement sum of big-endian 16-bit words (an odd tail is padded
/// with a zero byte), not yet folded. Summed as 32-bit words, which is the
/// same modulo 0xffff (2^16 is 1 there) and a quarter of the work.
pub fn sum16(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    let mut sum: u64 = 0;
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum + u64::from(u32::from_be_bytes(tail))
}

/// Fold a sum to 16 bits with end-around carry.
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum of TCP, UDP and ICMPv6 for `len` bytes.
pub fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    sum16(src) + sum16(dst) + u64::from(proto) + (len as u64 & 0xffff) + (len as u64 >> 16)
}

/// A sum with the two ones'-complement zeros made equal.
fn residue(sum: u64) -> u16 {
    match fold(sum) {
        0xffff => 0,
        r => r,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Egress,
    Ingress,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragPos {
    Whole,
    First,
    Later,
}

/// An IP header (the packet's own, or one quoted in an ICMP error) as the
/// RFCs define it, at fixed offsets into the frame.
#[derive(Clone, Copy, Debug)]
pub struct IpView {
    pub v6: bool,
    pub l3: usize,
    pub src: usize,
    pub dst: usize,
    pub alen: usize,
    /// Offset of the IPv4 header checksum.
    pub csum: Option<usize>,
    /// End of the IPv4 header (options included) or of the fixed IPv6 one.
    pub hdr_end: usize,
    /// End of the datagram by its own length field, within the limit given.
    pub end: usize,
    /// The upper-layer protocol (the last "next header" reached).
    pub proto: u8,
    /// Offset of the upper-layer header; none in a later fragment, or when
    /// an extension chain runs past the data.
    pub l4: Option<usize>,
}

impl IpView {
    pub fn addr(&self, bytes: &[u8], off: usize) -> Option<IpAddr> {
        let raw = bytes.get(off..off + self.alen)?;
        Some(if self.v6 {
            IpAddr::from(<[u8; 16]>::try_from(raw).ok()?)
        } else {
            IpAddr::from(<[u8; 4]>::try_from(raw).ok()?)
        })
    }

    /// The ICMP protocol number that belongs to this family.
    pub fn icmp_proto(&self) -> u8 {
        if self.v6 { ICMPV6 } else { ICMP }
    }
}

/// Parse the IP header at `l3`, reading nothing at or past `limit`.
pub fn ip_view(b: &[u8], l3: usize, limit: usize) -> Option<IpView> {
    let limit = limit.min(b.len());
    let first = *b.get(l3)?;
    match first >> 4 {
        4 => {
            if l3 + 20 > limit {
                return None;
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([b[l3 + 2], b[l3 + 3]]));
            let frag = u16::from_be_bytes([b[l3 + 6], b[l3 + 7]]);
            let frag = if frag & 0x1fff != 0 {
                FragPos::Later
            } else if frag & 0x2000 != 0 {
                FragPos::First
            } else {
                FragPos::Whole
            };
            let hdr_end = l3 + ihl;
            Some(IpView {
                v6: false,
                l3,
                src: l3 + 12,
                dst: l3 + 16,
                alen: 4,
                csum: Some(l3 + 10),
                hdr_end,
                end: limit.min(l3 + total),
                proto: b[l3 + 9],
                l4: (frag != FragPos::Later && hdr_end <= limit).then_some(hdr_end),
            })
        }
        6 => {
            if l3 + 40 > limit {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([b[l3 + 4], b[l3 + 5]]));
            let end = limit.min(l3 + 40 + payload);
            let mut next = b[l3 + 6];
            let mut off = l3 + 40;
            let mut frag = FragPos::Whole;
            let mut l4 = None;
            // Generous bound: a chain longer than this cannot fit a frame.
            for _ in 0..512 {
                let len = match next {
                    0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                        let Some(&n) = b.get(off + 1).filter(|_| off + 2 <= limit) else {
                            break;
                        };
                        (usize::from(n) + 1) * 8
                    }
                    AH => {
                        let Some(&n) = b.get(off + 1).filter(|_| off + 2 <= limit) else {
                            break;
                        };
                        (usize::from(n) + 2) * 4
                    }
                    FRAGMENT => {
                        if off + 8 > limit {
                            break;
                        }
                        let field = u16::from_be_bytes([b[off + 2], b[off + 3]]);
                        if field & 0xfff8 != 0 {
                            frag = FragPos::Later;
                        } else if field & 1 != 0 {
                            frag = FragPos::First;
                        }
                        8
                    }
                    _ => {
                        l4 = (off <= limit).then_some(off);
                        break;
                    }
                };
                next = b[off];
                off += len;
                if frag == FragPos::Later {
                    break;
                }
            }
            if frag == FragPos::Later {
                l4 = None;
            }
            Some(IpView {
                v6: true,
                l3,
                src: l3 + 8,
                dst: l3 + 24,
                alen: 16,
                csum: None,
                hdr_end: l3 + 40,
                end,
                proto: next,
                l4,
            })
        }
        _ => None,
    }
}

/// The packet's own IP header, when the Ethernet type says IP and the
/// version agrees with it.
pub fn outer_view(b: &[u8]) -> Option<IpView> {
    if b.len() < ETH_LEN {
        return None;
    }
    let view = ip_view(b, ETH_LEN, b.len())?;
    match (u16::from_be_bytes([b[12], b[13]]), view.v6) {
        (ETH_IPV4, false) | (ETH_IPV6, true) => Some(view),
        _ => None,
    }
}

/// Whether an ICMP message of `proto` and `kind` is an error (it quotes the
/// packet that caused it).
pub fn icmp_is_error(proto: u8, kind: u8) -> bool {
    match proto {
        ICMP => matches!(kind, 3 | 11 | 12),
        ICMPV6 => (1..=4).contains(&kind),
        _ => false,
    }
}

/// Whether an ICMP message is the echo kind that carries a flow's
/// identifier in `dir`: requests leave, replies come back.
fn icmp_is_echo(proto: u8, kind: u8, dir: Dir) -> bool {
    matches!(
        (proto, kind, dir),
        (ICMP, 8, Dir::Egress)
            | (ICMP, 0, Dir::Ingress)
            | (ICMPV6, 128, Dir::Egress)
            | (ICMPV6, 129, Dir::Ingress)
    )
}

/// A checksum and the bytes it covers.
#[derive(Clone, Copy, Debug)]
struct Scope {
    name: &'static str,
    field: usize,
    start: usize,
    end: usize,
    /// Source, destination and protocol of the pseudo-header, when the
    /// checksum has one.
    pseudo: Option<(usize, usize, usize, u8)>,
    /// A UDP checksum whose zero must stay zero: "none" in IPv4 and
    /// invalid in IPv6, neither may turn into something else.
    zero_kept: bool,
    /// The packet's own UDP checksum: a real one must never become zero.
    never_zero: bool,
}

impl Scope {
    fn sum(&self, b: &[u8]) -> u64 {
        let end = self.end.min(b.len());
        let mut sum = sum16(&b[self.start.min(end)..end]);
        if let Some((src, dst, alen, proto)) = self.pseudo {
            sum += pseudo_sum(
                &b[src..src + alen],
                &b[dst..dst + alen],
                proto,
                end - self.start,
            );
        }
        sum
    }

    fn field(&self, b: &[u8]) -> u16 {
        u16::from_be_bytes([b[self.field], b[self.field + 1]])
    }
}

/// What a translation of one input packet may change.
#[derive(Debug, Default)]
pub struct Rules {
    /// Byte ranges that may differ, with what they are (for messages).
    allowed: Vec<(usize, usize, &'static str)>,
    scopes: Vec<Scope>,
    /// The outer address the translation replaces (source on egress,
    /// destination on ingress) and its length.
    outer_addr: Option<(usize, usize)>,
    /// The translated port (or echo identifier) of the packet's own header.
    outer_port: Option<usize>,
    /// For an ICMP error: the outer and the quoted address that the
    /// translation points at the same host.
    pair: Option<(usize, usize, usize)>,
    /// End of the datagram by its length field.
    end: usize,
}

impl Rules {
    fn allow(&mut self, start: usize, len: usize, what: &'static str) {
        self.allowed.push((start, start + len, what));
    }

    fn what(&self, off: usize) -> Option<&'static str> {
        self.allowed
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&off))
            .map(|(_, _, w)| *w)
    }
}

/// The L4 fields of a transport header at `l4` (the packet's own, or the
/// quoted one) that carry the translated port, and its checksum.
fn transport_rules(
    rules: &mut Rules,
    b: &[u8],
    ip: &IpView,
    l4: usize,
    port_dir: Dir,
    quoted: bool,
) {
    let (port, port_what) = match port_dir {
        Dir::Egress => (l4, "source port"),
        Dir::Ingress => (l4 + 2, "destination port"),
    };
    let pseudo = Some((ip.src, ip.dst, ip.alen, ip.proto));
    let scope = |name, field, udp| Scope {
        name,
        field,
        start: l4,
        end: b.len(),
        pseudo,
        // A quoted IPv6 one is only a quote, its zero as wrong as any
        // other wrong value: updated like one.
        zero_kept: udp && !(quoted && ip.v6),
        // A quoted checksum is only a quote: checksum arithmetic may turn
        // its 0xffff into the equal 0x0000 (nobody validates a quote).
        never_zero: udp && !quoted,
    };
    match ip.proto {
        TCP => {
            rules.allow(port, 2, port_what);
            rules.allow(l4 + 16, 2, "TCP checksum");
            rules.scopes.push(scope(
                if quoted { "quoted TCP" } else { "TCP" },
                l4 + 16,
                false,
            ));
            if !quoted {
                rules.outer_port = Some(port);
            }
        }
        UDP => {
            rules.allow(port, 2, port_what);
            rules.allow(l4 + 6, 2, "UDP checksum");
            rules.scopes.push(scope(
                if quoted { "quoted UDP" } else { "UDP" },
                l4 + 6,
                true,
            ));
            if !quoted {
                rules.outer_port = Some(port);
            }
        }
        p if p == ip.icmp_proto() => {
            let Some(&kind) = b.get(l4) else {
                return;
            };
            rules.allow(l4 + 2, 2, "ICMP checksum");
            rules.scopes.push(Scope {
                name: if quoted { "quoted ICMP" } else { "ICMP" },
                field: l4 + 2,
                start: l4,
                end: b.len(),
                pseudo: if ip.v6 { pseudo } else { None },
                zero_kept: false,
                never_zero: false,
            });
            if icmp_is_echo(p, kind, port_dir) {
                rules.allow(l4 + 4, 2, "echo identifier");
                if !quoted {
                    rules.outer_port = Some(l4 + 4);
                }
            }
        }
        _ => {}
    }
}

/// The rules for translating `b` in `dir`.
pub fn rules(b: &[u8], dir: Dir) -> Rules {
    let mut rules = Rules::default();
    let Some(ip) = outer_view(b) else {
        return rules;
    };
    rules.end = ip.end;
    let (addr, what) = match dir {
        Dir::Egress => (ip.src, "source address"),
        Dir::Ingress => (ip.dst, "destination address"),
    };
    rules.allow(addr, ip.alen, what);
    rules.outer_addr = Some((addr, ip.alen));
    if let Some(csum) = ip.csum {
        rules.allow(csum, 2, "IPv4 header checksum");
        rules.scopes.push(Scope {
            name: "IPv4 header",
            field: csum,
            start: ip.l3,
            end: ip.hdr_end,
            pseudo: None,
            zero_kept: false,
            never_zero: false,
        });
    }
    let Some(l4) = ip.l4 else {
        return rules;
    };
    let error =
        ip.proto == ip.icmp_proto() && b.get(l4).is_some_and(|&k| icmp_is_error(ip.proto, k));
    if !error {
        transport_rules(&mut rules, b, &ip, l4, dir, false);
        return rules;
    }
    // An ICMP error: its checksum, and the quoted packet, which travelled
    // the other way (so its destination is translated on egress).
    rules.allow(l4 + 2, 2, "ICMP checksum");
    rules.scopes.push(Scope {
        name: "ICMP error",
        field: l4 + 2,
        start: l4,
        end: b.len(),
        pseudo: ip.v6.then_some((ip.src, ip.dst, ip.alen, ip.proto)),
        zero_kept: false,
        never_zero: false,
    });
    let Some(inner) = ip_view(b, l4 + 8, b.len()).filter(|i| i.v6 == ip.v6) else {
        return rules;
    };
    let (inner_addr, inner_what, port_dir) = match dir {
        Dir::Egress => (inner.dst, "quoted destination address", Dir::Ingress),
        Dir::Ingress => (inner.src, "quoted source address", Dir::Egress),
    };
    rules.allow(inner_addr, inner.alen, inner_what);
    rules.pair = Some((addr, inner_addr, ip.alen));
    if let Some(csum) = inner.csum {
        rules.allow(csum, 2, "quoted IPv4 header checksum");
        rules.scopes.push(Scope {
            name: "quoted IPv4 header",
            field: csum,
            start: inner.l3,
            end: inner.hdr_end,
            pseudo: None,
            zero_kept: false,
            never_zero: false,
        });
    }
    if let Some(inner_l4) = inner.l4 {
        transport_rules(&mut rules, b, &inner, inner_l4, port_dir, true);
    }
    rules
}

/// What a consistent translation changed.
#[derive(Debug)]
pub struct Translation {
    /// The translated outer address before and after, when it changed.
    pub addr: Option<(IpAddr, IpAddr)>,
    /// The translated port (or echo identifier) after, when it changed.
    pub port: Option<u16>,
    /// Whether a changed field lies past the end the packet's own length
    /// field gives (in frame padding the receiving stack trims).
    pub past_length: bool,
}

/// Check that `out` is a consistent translation of `input` in `dir`: the
/// same length, only allowed fields changed, every checksum consistent.
pub fn translation(input: &[u8], out: &[u8], dir: Dir) -> Result<Translation, String> {
    if input.len() != out.len() {
        return Err(format!(
            "length changed from {} to {} bytes",
            input.len(),
            out.len()
        ));
    }
    let rules = rules(input, dir);
    let mut past_length = false;
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        if a == b {
            continue;
        }
        if rules.what(i).is_none() {
            return Err(format!(
                "byte {i} changed ({a:#04x} -> {b:#04x}) but no translated field is there"
            ));
        }
        past_length |= i >= rules.end;
    }
    for scope in &rules.scopes {
        if scope.field + 2 > input.len() || scope.start > input.len() {
            continue;
        }
        let (before, after) = (scope.field(input), scope.field(out));
        if scope.zero_kept && before == 0 {
            if after != 0 {
                return Err(format!(
                    "{} checksum was 0 (none, or invalid in IPv6) and became {after:#06x}",
                    scope.name
                ));
            }
            continue;
        }
        if scope.never_zero && before != 0 && after == 0 {
            return Err(format!(
                "{} checksum {before:#06x} became 0, which means \"none\" (IPv4) or is invalid (IPv6)",
                scope.name
            ));
        }
        let (r_in, r_out) = (residue(scope.sum(input)), residue(scope.sum(out)));
        if r_in != r_out {
            let state = if r_in == 0 {
                "was valid and no longer verifies"
            } else {
                "was wrong and changed by another amount than the translation"
            };
            return Err(format!(
                "{} checksum {state} (field {before:#06x} -> {after:#06x}, sum residue {r_in:#06x} -> {r_out:#06x})",
                scope.name
            ));
        }
    }
    if let Some((outer, inner, len)) = rules.pair
        && out[outer..outer + len] != out[inner..inner + len]
    {
        return Err(
            "the ICMP error's outer address and the quoted packet's do not name the same host"
                .to_owned(),
        );
    }
    let addr = rules.outer_addr.and_then(|(off, len)| {
        (input[off..off + len] != out[off..off + len]).then(|| {
            let get = |b: &[u8]| -> IpAddr {
                if len == 4 {
                    IpAddr::from(<[u8; 4]>::try_from(&b[off..off + 4]).unwrap())
                } else {
                    IpAddr::from(<[u8; 16]>::try_from(&b[off..off + 16]).unwrap())
                }
            };
            (get(input), get(out))
        })
    });
    let port = rules.outer_port.and_then(|off| {
        let (a, b) = (input.get(off..off + 2)?, out.get(off..off + 2)?);
        (a != b).then(|| u16::from_be_bytes([b[0], b[1]]))
    });
    Ok(Translation {
        addr,
        port,
        past_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet/IPv4/UDP 10.0.0.1:1000 -> 10.0.0.2:53, 4 payload bytes,
    /// valid checksums.
    fn udp4() -> Vec<u8> {
        let mut b = vec![0u8; 14];
        b[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 32, 0, 1, 0, 0, 64, UDP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = !fold(sum16(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        b.extend_from_slice(&ip);
        let mut udp = vec![0x03, 0xe8, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4];
        let c = !fold(sum16(&udp) + pseudo_sum(&[10, 0, 0, 1], &[10, 0, 0, 2], UDP, 12));
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        b.extend_from_slice(&udp);
        b
    }

    /// Replace the IPv4 source the way the kernel helpers do.
    fn translate(b: &[u8], new: [u8; 4]) -> Vec<u8> {
        let mut out = b.to_vec();
        out[26..30].copy_from_slice(&new);
        let fix = |out: &mut Vec<u8>, at: usize, old: &[u8], new: &[u8]| {
            let c = u16::from_be_bytes([out[at], out[at + 1]]);
            let s = u64::from(!c) + sum16(new) + u64::from(!fold(sum16(old)));
            out[at..at + 2].copy_from_slice(&(!fold(s)).to_be_bytes());
        };
        fix(&mut out, 24, &b[26..30], &new);
        fix(&mut out, 40, &b[26..30], &new);
        out
    }

    #[test]
    fn verify_sum_of_words_matches_16_bit_definition() {
        let data: Vec<u8> = (0..=255u8)
            .cycle()
            .take(1001)
            .map(|b| b.wrapping_mul(37))
            .collect();
        for len in [0, 1, 2, 3, 5, 8, 1000, 1001] {
            let slice = &data[..len];
            let by16: u64 = slice
                .chunks(2)
                .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
                .sum();
            assert_eq!(fold(sum16(slice)), fold(by16), "length {len}");
        }
    }

    #[test]
    fn verify_consistent_source_rewrite_accepted() {
        let input = udp4();
        let out = translate(&input, [203, 0, 113, 10]);
        let t = translation(&input, &out, Dir::Egress).unwrap();
        assert!(t.addr.is_some(), "the address change must be reported");
    }

    #[test]
    fn verify_wrong_checksum_stays_wrong_by_same_amount_accepted() {
        let mut input = udp4();
        input[41] ^= 0x10;
        let out = translate(&input, [203, 0, 113, 10]);
        translation(&input, &out, Dir::Egress)
            .expect("an incremental update of a wrong checksum must be accepted");
    }

    #[test]
    fn verify_address_without_l4_checksum_update_rejected() {
        let input = udp4();
        let mut out = translate(&input, [203, 0, 113, 10]);
        out[40..42].copy_from_slice(&input[40..42]);
        let err = translation(&input, &out, Dir::Egress).unwrap_err();
        assert!(err.contains("UDP checksum"), "{err}");
    }

    #[test]
    fn verify_change_outside_translated_fields_rejected() {
        let input = udp4();
        let mut out = input.clone();
        out[22] = 63;
        let err = translation(&input, &out, Dir::Egress).unwrap_err();
        assert!(err.contains("byte 22"), "{err}");
    }

    #[test]
    fn verify_ingress_may_not_touch_source() {
        let input = udp4();
        let out = translate(&input, [203, 0, 113, 10]);
        assert!(
            translation(&input, &out, Dir::Ingress).is_err(),
            "ingress translates destinations only"
        );
    }
}
