// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Flow tuples: the keys of the connection and reverse-NAT tables.

/// IP protocol numbers the dataplane understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// An IPv4 flow in its outgoing direction (client -> internet).
///
/// For ICMP echo, `sport_be` carries the echo identifier and `dport_be` is 0,
/// so an echo "flow" translates like a UDP flow whose port is the identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple4 {
    /// Source address, network byte order.
    pub src_be: u32,
    /// Destination address, network byte order.
    pub dst_be: u32,
    /// Source port (or ICMP echo identifier), network byte order.
    pub sport_be: u16,
    /// Destination port (0 for ICMP), network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _reserved: [u8; 3],
}
const _: () = assert!(size_of::<Tuple4>() == 16);
#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no implicit padding (size asserted above).
unsafe impl aya::Pod for Tuple4 {}

impl Tuple4 {
    pub const fn new(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        Self {
            src_be,
            dst_be,
            sport_be,
            dport_be,
            proto,
            _reserved: [0; 3],
        }
    }

    /// The same flow seen from the other end: what a reply carries.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.dst_be,
            self.src_be,
            self.dport_be,
            self.sport_be,
            self.proto,
        )
    }
}
