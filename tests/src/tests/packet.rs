//! Crafted packets for BPF_PROG_TEST_RUN, and a parser that checks every
//! checksum of what comes out.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 0x1000_0000, 64240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// A UDP packet whose checksum is 0 ("not computed", legal in IPv4).
pub fn udp_no_checksum(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = udp(src, dst, payload);
    out[14 + 20 + 6] = 0;
    out[14 + 20 + 7] = 0;
    out
}

pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC).ipv4(src.octets(), dst.octets(), 64);
    let builder = if request {
        builder.icmpv4_echo_request(id, 1)
    } else {
        builder.icmpv4_echo_reply(id, 1)
    };
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// An IPv4 packet of another protocol (GRE, 47) with a valid header checksum.
pub fn other_protocol(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(
        8,
        64,
        etherparse::IpNumber(protocol),
        src.octets(),
        dst.octets(),
    )
    .unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    etherparse::Ethernet2Header {
        source: CLIENT_MAC,
        destination: GW_MAC,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut out)
    .unwrap();
    ip.write(&mut out).unwrap();
    out.extend_from_slice(&[0; 8]);
    out
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[0x08, 0x06]);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[10, 10, 0, 2]);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&[10, 10, 0, 1]);
    out
}

/// The addressing of a parsed packet. For ICMP echo both ports hold the identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
}

/// Parse an Ethernet/IPv4 packet and assert that the IP header checksum and
/// the L4 checksum (pseudo-header included) verify.
pub fn checked(bytes: &[u8]) -> Summary {
    let headers =
        PacketHeaders::from_ethernet_slice(bytes).expect("output must parse as Ethernet/IPv4");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("output is not IPv4: {bytes:02x?}");
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum must verify"
    );
    let payload = headers.payload.slice();
    let (sport, dport) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv4(ip, payload).unwrap(),
                "TCP checksum must verify"
            );
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            if udp.checksum != 0 {
                assert_eq!(
                    udp.checksum,
                    udp.calc_checksum_ipv4(ip, payload).unwrap(),
                    "UDP checksum must verify"
                );
            }
            (udp.source_port, udp.destination_port)
        }
        Some(TransportHeader::Icmpv4(icmp)) => {
            assert_eq!(
                icmp.checksum,
                icmp.icmp_type.calc_checksum(payload),
                "ICMP checksum must verify"
            );
            let id = match icmp.icmp_type {
                etherparse::Icmpv4Type::EchoRequest(e) | etherparse::Icmpv4Type::EchoReply(e) => {
                    e.id
                }
                _ => 0,
            };
            (id, id)
        }
        _ => (0, 0),
    };
    Summary {
        src: SocketAddrV4::new(ip.source.into(), sport),
        dst: SocketAddrV4::new(ip.destination.into(), dport),
        proto: ip.protocol.0,
    }
}

/// The UDP checksum field of an Ethernet/IPv4/UDP packet without options.
pub fn udp_checksum(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[14 + 20 + 6], bytes[14 + 20 + 7]])
}

/// The fragments of an IPv4 UDP datagram (identification `id`), the first
/// carrying `first_len` bytes of the UDP datagram (a multiple of 8).
pub fn udp_fragments(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    id: u16,
    payload: &[u8],
    first_len: usize,
) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
    let whole = udp(src, dst, payload);
    let datagram = &whole[14 + 20..];
    let piece = |bytes: &[u8], offset: usize, more: bool| {
        let mut ip = etherparse::Ipv4Header::new(
            bytes.len() as u16,
            64,
            etherparse::IpNumber::UDP,
            src.ip().octets(),
            dst.ip().octets(),
        )
        .unwrap();
        ip.identification = id;
        ip.more_fragments = more;
        ip.dont_fragment = false;
        ip.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = whole[..14].to_vec();
        ip.write(&mut out).unwrap();
        out.extend_from_slice(bytes);
        out
    };
    [
        piece(&datagram[..first_len], 0, true),
        piece(&datagram[first_len..], first_len, false),
    ]
}

/// Put IPv4 fragments (as they came out) back together into one frame, for
/// checking the datagram's checksum; asserts each fragment's header checksum.
pub fn reassemble(fragments: &[&[u8]]) -> Vec<u8> {
    let mut out = fragments[0][..14 + 20].to_vec();
    for frag in fragments {
        let (ip, _) = etherparse::Ipv4Header::from_slice(&frag[14..]).unwrap();
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "every fragment's header checksum must verify"
        );
        out.extend_from_slice(&frag[14 + 20..]);
    }
    let total = (out.len() - 14) as u16;
    out[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    out[14 + 6] = 0;
    out[14 + 7] = 0;
    let (mut ip, _) = etherparse::Ipv4Header::from_slice(&out[14..]).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    out[14 + 10..14 + 12].copy_from_slice(&ip.header_checksum.to_be_bytes());
    out
}

// ---- IPv6 --------------------------------------------------------------

use std::net::{Ipv6Addr, SocketAddrV6};

pub fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

fn builder6(src: Ipv6Addr, dst: Ipv6Addr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC).ipv6(src.octets(), dst.octets(), 64)
}

pub fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, syn: bool, payload: &[u8]) -> Vec<u8> {
    let builder = builder6(*src.ip(), *dst.ip()).tcp(src.port(), dst.port(), 0x1000_0000, 64240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

pub fn udp6(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let builder = builder6(*src.ip(), *dst.ip()).udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

pub fn echo6(src: Ipv6Addr, dst: Ipv6Addr, request: bool, id: u16, payload: &[u8]) -> Vec<u8> {
    let builder = builder6(src, dst);
    let builder = if request {
        builder.icmpv6_echo_request(id, 1)
    } else {
        builder.icmpv6_echo_reply(id, 1)
    };
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// The addressing of a parsed IPv6 packet; for ICMPv6 echo both ports hold
/// the identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub proto: u8,
}

/// Parse an Ethernet/IPv6 packet and assert that its L4 checksum
/// (pseudo-header included) verifies.
pub fn checked6(bytes: &[u8]) -> Summary6 {
    let headers =
        PacketHeaders::from_ethernet_slice(bytes).expect("output must parse as Ethernet/IPv6");
    let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
        panic!("output is not IPv6: {bytes:02x?}");
    };
    let payload = headers.payload.slice();
    let (sport, dport) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv6(ip, payload).unwrap(),
                "TCP checksum must verify"
            );
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            assert_eq!(
                udp.checksum,
                udp.calc_checksum_ipv6(ip, payload).unwrap(),
                "UDP checksum must verify"
            );
            (udp.source_port, udp.destination_port)
        }
        Some(TransportHeader::Icmpv6(icmp)) => {
            assert_eq!(
                icmp.checksum,
                icmp.icmp_type
                    .calc_checksum(ip.source, ip.destination, payload)
                    .unwrap(),
                "ICMPv6 checksum must verify"
            );
            let id = match icmp.icmp_type {
                etherparse::Icmpv6Type::EchoRequest(e) | etherparse::Icmpv6Type::EchoReply(e) => {
                    e.id
                }
                _ => 0,
            };
            (id, id)
        }
        _ => (0, 0),
    };
    Summary6 {
        src: sa6(ip.source.into(), sport),
        dst: sa6(ip.destination.into(), dport),
        proto: ip.next_header.0,
    }
}

// ---- ICMP errors -------------------------------------------------------

/// An ICMPv4 error from `router` to `to` quoting `quoted` (an IP packet, no
/// Ethernet header), with valid checksums.
pub fn icmp4_error(
    router: Ipv4Addr,
    to: Ipv4Addr,
    kind: etherparse::Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
        .ipv4(router.octets(), to.octets(), 64)
        .icmpv4(kind);
    let mut out = Vec::with_capacity(builder.size(quoted.len()));
    builder.write(&mut out, quoted).unwrap();
    out
}

/// An ICMPv6 error from `router` to `to` quoting `quoted` (an IPv6 packet).
pub fn icmp6_error(
    router: Ipv6Addr,
    to: Ipv6Addr,
    kind: etherparse::Icmpv6Type,
    quoted: &[u8],
) -> Vec<u8> {
    let builder = builder6(router, to).icmpv6(kind);
    let mut out = Vec::with_capacity(builder.size(quoted.len()));
    builder.write(&mut out, quoted).unwrap();
    out
}

/// What an ICMP error carries, both layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorSummary {
    /// Outer source and destination addresses.
    pub outer_src: std::net::IpAddr,
    pub outer_dst: std::net::IpAddr,
    /// The quoted packet's addresses and ports (echo: the identifier).
    pub inner_src: std::net::SocketAddr,
    pub inner_dst: std::net::SocketAddr,
}

/// Parse an ICMP error (either family) and assert every checksum that must
/// hold: the outer IPv4 header, the ICMP checksum over the whole message,
/// the quoted IPv4 header. Quoted L4 checksums cannot be checked (the quote
/// is usually cut short), so callers compare them with the original.
pub fn checked_error(bytes: &[u8]) -> ErrorSummary {
    use std::net::{IpAddr, SocketAddr};
    let headers = PacketHeaders::from_ethernet_slice(bytes).expect("the error must parse");
    let payload = headers.payload.slice();
    let (outer_src, outer_dst): (IpAddr, IpAddr) = match (&headers.net, &headers.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Icmpv4(icmp))) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "outer IPv4 header checksum must verify"
            );
            assert_eq!(
                icmp.checksum,
                icmp.icmp_type.calc_checksum(payload),
                "ICMP checksum must verify"
            );
            (
                Ipv4Addr::from(ip.source).into(),
                Ipv4Addr::from(ip.destination).into(),
            )
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Icmpv6(icmp))) => {
            assert_eq!(
                icmp.checksum,
                icmp.icmp_type
                    .calc_checksum(ip.source, ip.destination, payload)
                    .unwrap(),
                "ICMPv6 checksum must verify"
            );
            (
                Ipv6Addr::from(ip.source).into(),
                Ipv6Addr::from(ip.destination).into(),
            )
        }
        _ => panic!("not an ICMP error: {bytes:02x?}"),
    };
    // The quoted packet: an IP header and at least 8 bytes of L4.
    let (inner_src, inner_dst, l4): (IpAddr, IpAddr, &[u8]) = if payload[0] >> 4 == 4 {
        let (ip, rest) = etherparse::Ipv4Header::from_slice(payload).unwrap();
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "quoted IPv4 header checksum must verify"
        );
        (
            Ipv4Addr::from(ip.source).into(),
            Ipv4Addr::from(ip.destination).into(),
            rest,
        )
    } else {
        let (ip, rest) = etherparse::Ipv6Header::from_slice(payload).unwrap();
        (
            Ipv6Addr::from(ip.source).into(),
            Ipv6Addr::from(ip.destination).into(),
            rest,
        )
    };
    let proto = if payload[0] >> 4 == 4 {
        payload[9]
    } else {
        payload[6]
    };
    let (sport, dport) = match proto {
        6 | 17 => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        _ => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (id, id)
        }
    };
    ErrorSummary {
        outer_src,
        outer_dst,
        inner_src: SocketAddr::new(inner_src, sport),
        inner_dst: SocketAddr::new(inner_dst, dport),
    }
}

/// The IP packet inside an Ethernet frame (what an ICMP error quotes).
pub fn ip_of(frame: &[u8]) -> &[u8] {
    &frame[14..]
}
