// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Flow tuples: the keys of the connection and reverse-NAT tables.

/// IP protocol numbers the dataplane understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// An IPv4 address in network byte order, as read from the packet.
pub type Addr4 = u32;
/// An IPv6 address as four network-order words, as read from the packet.
pub type Addr6 = [u32; 4];

/// A flow in its outgoing direction (client -> internet).
///
/// For ICMP echo, `sport_be` carries the echo identifier and `dport_be` is 0,
/// so an echo "flow" translates like a UDP flow whose port is the identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple<A> {
    /// Source address, network byte order.
    pub src: A,
    /// Destination address, network byte order.
    pub dst: A,
    /// Source port (or ICMP echo identifier), network byte order.
    pub sport_be: u16,
    /// Destination port (0 for ICMP), network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _reserved: [u8; 3],
}

pub type Tuple4 = Tuple<Addr4>;
pub type Tuple6 = Tuple<Addr6>;
const _: () = assert!(size_of::<Tuple4>() == 16);
const _: () = assert!(size_of::<Tuple6>() == 40);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (sizes asserted above).
unsafe impl aya::Pod for Tuple4 {}
#[cfg(feature = "user")]
// SAFETY: as for Tuple4.
unsafe impl aya::Pod for Tuple6 {}

impl<A: Copy> Tuple<A> {
    pub const fn new(src: A, dst: A, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            sport_be,
            dport_be,
            proto,
            _reserved: [0; 3],
        }
    }

    /// The same flow seen from the other end: what a reply carries.
    pub const fn reversed(&self) -> Self {
        Self::new(self.dst, self.src, self.dport_be, self.sport_be, self.proto)
    }
}
