//! Which network addresses a node may dial when someone else told it of
//! them (a peer record from a relay, and later DHT answers and contact
//! cards). A record is signed by its peer, but the peer chooses what it
//! lists: dialling loopback or a private range on its word would let any
//! stranger aim our node at our own machine or LAN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether addresses learned from others may be private.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressPolicy {
    /// Only globally reachable addresses (the default).
    #[default]
    PublicOnly,
    /// Any address, loopback and private ranges included: for a LAN, a
    /// test, or the demo on one machine (`--allow-private-addresses`).
    AllowPrivate,
}

impl AddressPolicy {
    /// Whether an address someone else gave us may be dialled.
    pub fn permits(self, addr: &SocketAddr) -> bool {
        if addr.port() == 0 {
            return false;
        }
        match self {
            AddressPolicy::AllowPrivate => !addr.ip().is_unspecified() && !addr.ip().is_multicast(),
            AddressPolicy::PublicOnly => is_public(addr.ip()),
        }
    }

    /// The first address in `addresses` that parses and that this policy
    /// permits.
    pub fn first_permitted<'a>(self, addresses: impl IntoIterator<Item = &'a String>) -> Option<SocketAddr> {
        addresses.into_iter().filter_map(|a| a.parse::<SocketAddr>().ok()).find(|a| self.permits(a))
    }
}

/// Whether `ip` is globally reachable: not unspecified, loopback, private,
/// shared (carrier-grade NAT), link-local, multicast, broadcast,
/// documentation or otherwise reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let reserved = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (RFC 6598)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking (RFC 2544)
        || a >= 240; // reserved
    !reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let reserved = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local (fc00::/7)
        || (first & 0xffc0) == 0xfe80 // link-local (fe80::/10)
        || (first & 0xffc0) == 0xfec0 // site-local, deprecated (fec0::/10)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || ip.segments()[..6] == [0, 0, 0, 0, 0, 0]; // IPv4-compatible, deprecated
    !reserved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn private_loopback_and_link_local_addresses_are_not_public() {
        for s in [
            "127.0.0.1:4433",
            "10.0.0.1:4433",
            "172.16.5.4:4433",
            "192.168.1.1:4433",
            "169.254.1.1:4433",
            "100.64.0.1:4433",
            "0.0.0.0:4433",
            "255.255.255.255:4433",
            "224.0.0.1:4433",
            "[::1]:4433",
            "[::]:4433",
            "[fd00::1]:4433",
            "[fe80::1]:4433",
            "[::ffff:10.0.0.1]:4433",
            "[::ffff:127.0.0.1]:4433",
            "[2001:db8::1]:4433",
        ] {
            assert!(!AddressPolicy::PublicOnly.permits(&addr(s)), "{s} was permitted");
        }
    }

    #[test]
    fn public_addresses_are_permitted_and_private_ones_only_when_allowed() {
        for s in ["203.0.114.7:4433", "8.8.8.8:53", "[2a01:4f8::1]:4433", "[::ffff:8.8.8.8]:53"] {
            assert!(AddressPolicy::PublicOnly.permits(&addr(s)), "{s} was refused");
        }
        assert!(AddressPolicy::AllowPrivate.permits(&addr("127.0.0.1:4433")));
        assert!(AddressPolicy::AllowPrivate.permits(&addr("10.0.0.1:4433")));
        assert!(!AddressPolicy::AllowPrivate.permits(&addr("0.0.0.0:4433")), "never the unspecified address");
        assert!(!AddressPolicy::AllowPrivate.permits(&addr("127.0.0.1:0")), "never port 0");
    }

    #[test]
    fn the_first_permitted_address_is_chosen() {
        let listed: Vec<String> = vec!["not an address".into(), "10.0.0.1:1".into(), "8.8.8.8:53".into()];
        assert_eq!(AddressPolicy::PublicOnly.first_permitted(&listed), Some(addr("8.8.8.8:53")));
        assert_eq!(AddressPolicy::AllowPrivate.first_permitted(&listed), Some(addr("10.0.0.1:1")));
    }
}
