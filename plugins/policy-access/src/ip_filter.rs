//! `ip-filter`: allows or forbids client addresses.
//!
//! The configured addresses and ranges become sorted, merged intervals per family, so a request
//! costs one parse of the client address and a binary search, whatever the list's length.
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`), from the client or in the configuration, are
//! treated as the IPv4 address.

use std::net::IpAddr;

use ipnet::IpNet;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

use crate::refuse;

/// What the listed addresses mean.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "snake_case")]
pub enum IpFilterAction {
    /// Only the listed addresses pass.
    Allow,
    /// The listed addresses are refused; everyone else passes.
    Forbid,
}

/// An inclusive range of addresses of one family (APIM's `address-range from/to`).
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct AddressRange {
    from: String,
    to: String,
}

/// `ip-filter` configuration: `{"action": "allow", "addresses": ["10.0.0.1"],
/// "ranges": ["10.0.0.0/8"], "address_ranges": [{"from": "…", "to": "…"}]}`.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct IpFilterConfig {
    action: IpFilterAction,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ranges: Vec<String>,
    #[serde(default)]
    address_ranges: Vec<AddressRange>,
}

/// Sorted, non-overlapping inclusive intervals.
#[derive(Debug, Default)]
struct Intervals<T>(Vec<(T, T)>);

impl<T: Ord + Copy + Successor> Intervals<T> {
    fn build(mut v: Vec<(T, T)>) -> Self {
        v.sort_unstable();
        let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                // Overlapping or adjacent: extend.
                Some(last) if lo <= last.1 || last.1.succ() == Some(lo) => {
                    last.1 = last.1.max(hi);
                }
                _ => out.push((lo, hi)),
            }
        }
        Intervals(out)
    }

    fn contains(&self, x: T) -> bool {
        let i = self.0.partition_point(|r| r.0 <= x);
        i > 0 && self.0[i - 1].1 >= x
    }
}

trait Successor: Sized {
    fn succ(self) -> Option<Self>;
}

impl Successor for u32 {
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Successor for u128 {
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

/// Allows or forbids client addresses.
pub struct IpFilter {
    allow: bool,
    v4: Intervals<u32>,
    v6: Intervals<u128>,
}

/// An address with IPv4-mapped IPv6 turned into IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A CIDR network as an inclusive range, IPv4-mapped IPv6 networks as IPv4.
fn net_range(net: IpNet) -> (IpAddr, IpAddr) {
    let net = net.trunc();
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let (Some(lo), Some(hi)) = (
                v6.network().to_ipv4_mapped(),
                v6.broadcast().to_ipv4_mapped(),
            ) {
                return (IpAddr::V4(lo), IpAddr::V4(hi));
            }
        }
    }
    (net.network(), net.broadcast())
}

fn parse_ip(field: &str, i: usize, s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse::<IpAddr>()
        .map(canonical)
        .map_err(|_| format!("{field}[{i}]: '{s}' is not an IPv4 or IPv6 address"))
}

impl Policy for IpFilter {
    type Config = IpFilterConfig;

    fn new(c: IpFilterConfig) -> Result<Self, String> {
        if c.addresses.is_empty() && c.ranges.is_empty() && c.address_ranges.is_empty() {
            return Err(
                "ip-filter needs at least one entry in addresses, ranges or address_ranges".into(),
            );
        }
        let mut pairs: Vec<(IpAddr, IpAddr)> = Vec::new();
        for (i, a) in c.addresses.iter().enumerate() {
            let ip = parse_ip("addresses", i, a)?;
            pairs.push((ip, ip));
        }
        for (i, r) in c.ranges.iter().enumerate() {
            let net: IpNet = r.trim().parse().map_err(|_| {
                format!("ranges[{i}]: '{r}' is not a CIDR range (e.g. 10.0.0.0/8 or 2001:db8::/32)")
            })?;
            pairs.push(net_range(net));
        }
        for (i, r) in c.address_ranges.iter().enumerate() {
            let from = parse_ip("address_ranges", i, &r.from)?;
            let to = parse_ip("address_ranges", i, &r.to)?;
            if from.is_ipv4() != to.is_ipv4() {
                return Err(format!(
                    "address_ranges[{i}]: from ({}) and to ({}) are of different IP versions",
                    r.from, r.to
                ));
            }
            if from > to {
                return Err(format!(
                    "address_ranges[{i}]: from ({}) is after to ({})",
                    r.from, r.to
                ));
            }
            pairs.push((from, to));
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (lo, hi) in pairs {
            match (lo, hi) {
                (IpAddr::V4(lo), IpAddr::V4(hi)) => v4.push((u32::from(lo), u32::from(hi))),
                (IpAddr::V6(lo), IpAddr::V6(hi)) => v6.push((u128::from(lo), u128::from(hi))),
                _ => unreachable!("both ends have one family"),
            }
        }
        Ok(IpFilter {
            allow: c.action == IpFilterAction::Allow,
            v4: Intervals::build(v4),
            v6: Intervals::build(v6),
        })
    }

    fn on_request(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let raw = ctx.client_ip();
        let ip = raw
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(canonical);
        let listed = match ip {
            Ok(IpAddr::V4(v4)) => self.v4.contains(u32::from(v4)),
            Ok(IpAddr::V6(v6)) => self.v6.contains(u128::from(v6)),
            // An address the gateway could not give is refused either way: fail closed.
            Err(_) => !self.allow,
        };
        if listed == self.allow {
            return Flow::CONTINUE;
        }
        let message = format!("Caller IP address {raw} is not allowed.");
        refuse(ctx, 403, "ip_forbidden", &message, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::serde_json::{self, Value};
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().expect("v4")
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().expect("v6")
    }

    fn run(config: &str, ip: &str) -> (Flow, TestContext) {
        let p = policy::<IpFilter>(config).unwrap_or_else(|e| panic!("{}", e.message));
        let mut ctx = TestContext {
            client_ip: ip.into(),
            ..TestContext::default()
        };
        let flow = on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx);
        (flow, ctx)
    }

    #[test]
    fn allow_lists_pass_only_listed_addresses() {
        let cfg = r#"{"action":"allow","addresses":["192.0.2.7","2001:db8::1"],
                      "ranges":["10.0.0.0/8","2001:db8:1::/48"],
                      "address_ranges":[{"from":"172.16.0.10","to":"172.16.0.20"}]}"#;
        for ip in [
            "192.0.2.7",
            "10.0.0.0",
            "10.255.255.255",
            "172.16.0.10",
            "172.16.0.15",
            "172.16.0.20",
            "2001:db8::1",
            "2001:db8:1:ffff::9",
            "::ffff:10.1.2.3",
            "[2001:db8::1]",
        ] {
            assert_eq!(run(cfg, ip).0, Flow::CONTINUE, "{ip}");
        }
        for ip in [
            "192.0.2.8",
            "11.0.0.0",
            "172.16.0.9",
            "172.16.0.21",
            "2001:db8::2",
            "2001:db8:2::1",
            "::ffff:11.0.0.1",
            "not an address",
            "",
        ] {
            let (flow, ctx) = run(cfg, ip);
            assert_eq!(flow, Flow::RESPOND, "{ip}");
            let (status, headers, body) = ctx.response.unwrap();
            assert_eq!(status, 403);
            assert_eq!(
                headers,
                vec![("content-type".into(), b"application/json".to_vec())]
            );
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"], "ip_forbidden");
            assert_eq!(body["statusCode"], 403);
            assert!(body["message"].as_str().unwrap().contains(ip), "{body}");
        }
    }

    #[test]
    fn forbid_lists_refuse_listed_addresses() {
        let cfg = r#"{"action":"forbid","ranges":["127.0.0.0/8","::1/128"]}"#;
        assert_eq!(run(cfg, "127.0.0.1").0, Flow::RESPOND);
        assert_eq!(run(cfg, "::1").0, Flow::RESPOND);
        assert_eq!(run(cfg, "::ffff:127.0.0.1").0, Flow::RESPOND);
        assert_eq!(run(cfg, "192.0.2.1").0, Flow::CONTINUE);
        assert_eq!(run(cfg, "2001:db8::1").0, Flow::CONTINUE);
        // An address that cannot be read is refused in forbid mode as well.
        assert_eq!(run(cfg, "garbage").0, Flow::RESPOND);
    }

    #[test]
    fn mapped_configuration_entries_are_ipv4_and_ranges_merge() {
        let cfg = r#"{"action":"allow","addresses":["::ffff:192.0.2.1"],
                      "ranges":["::ffff:10.0.0.0/112", "10.1.0.0/16"]}"#;
        assert_eq!(run(cfg, "192.0.2.1").0, Flow::CONTINUE);
        assert_eq!(run(cfg, "::ffff:192.0.2.1").0, Flow::CONTINUE);
        assert_eq!(run(cfg, "10.0.5.5").0, Flow::CONTINUE);
        assert_eq!(run(cfg, "10.1.2.3").0, Flow::CONTINUE);
        assert_eq!(run(cfg, "10.2.0.1").0, Flow::RESPOND);
        assert_eq!(
            run(cfg, "::a00:505").0,
            Flow::RESPOND,
            "IPv4-compatible is not mapped"
        );
        // Host bits in a CIDR entry are ignored (the network is used).
        let cfg = r#"{"action":"allow","ranges":["10.9.9.9/24"]}"#;
        assert_eq!(run(cfg, "10.9.9.0").0, Flow::CONTINUE);
        assert_eq!(run(cfg, "10.9.10.0").0, Flow::RESPOND);

        let merged = Intervals::build(vec![(5u32, 9), (1, 3), (4, 4), (20, 30), (25, 26)]);
        assert_eq!(merged.0, vec![(1, 9), (20, 30)]);
        assert!(merged.contains(1) && merged.contains(9) && merged.contains(30));
        assert!(!merged.contains(0) && !merged.contains(10) && !merged.contains(31));
        let edge = Intervals::build(vec![(u32::MAX - 1, u32::MAX), (0, 0)]);
        assert!(edge.contains(u32::MAX) && edge.contains(0) && !edge.contains(1));
        assert_eq!(u32::from(v4("0.0.0.1")), 1);
        assert_eq!(u128::from(v6("::2")), 2);
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        for (cfg, needle) in [
            (r#"{"action":"allow"}"#, "at least one"),
            (r#"{"action":"permit","addresses":["10.0.0.1"]}"#, "permit"),
            (
                r#"{"action":"allow","addresses":["10.0.0.300"]}"#,
                "addresses[0]",
            ),
            (r#"{"action":"allow","ranges":["10.0.0.1"]}"#, "ranges[0]"),
            (
                r#"{"action":"allow","ranges":["10.0.0.0/33"]}"#,
                "ranges[0]",
            ),
            (
                r#"{"action":"allow","address_ranges":[{"from":"10.0.0.2","to":"10.0.0.1"}]}"#,
                "is after",
            ),
            (
                r#"{"action":"allow","address_ranges":[{"from":"10.0.0.1","to":"::1"}]}"#,
                "different IP versions",
            ),
            (r#"{"action":"allow","adresses":["10.0.0.1"]}"#, "adresses"),
        ] {
            let e = policy::<IpFilter>(cfg).err().expect(cfg);
            assert!(e.message.contains(needle), "{cfg}: {}", e.message);
        }
    }
}
