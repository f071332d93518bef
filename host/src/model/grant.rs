//! Outbound HTTP grants: which origins a step may reach, and which
//! addresses no name may lead to unless granted by address.
//!
//! A grant is written `host`, `host:port` or `scheme://host[:port]`, where
//! `host` may begin with one wildcard label (`*.example.org`: any name
//! below `example.org`, not `example.org` itself). Without a scheme, both
//! `http` and `https` are granted; without a port, the scheme's own (80,
//! 443). A grant whose host is an IP address (`127.0.0.1:8089`, `[::1]`)
//! grants that address, private or not; a name never does: a name that
//! resolves to a loopback, private or link-local address is refused.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One granted origin (or family of origins).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpGrant {
    /// `None`: `http` and `https`.
    scheme: Option<HttpScheme>,
    host: GrantHost,
    /// `None`: the scheme's default port.
    port: Option<u16>,
    /// As written, for messages and serialisation.
    text: String,
}

/// The schemes a step may send requests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpScheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl HttpScheme {
    /// The port a URL of this scheme means when it names none.
    pub fn default_port(self) -> u16 {
        match self {
            HttpScheme::Http => 80,
            HttpScheme::Https => 443,
        }
    }

    fn parse(text: &str) -> Option<HttpScheme> {
        match text.to_ascii_lowercase().as_str() {
            "http" => Some(HttpScheme::Http),
            "https" => Some(HttpScheme::Https),
            _ => None,
        }
    }
}

impl fmt::Display for HttpScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpScheme::Http => "http",
            HttpScheme::Https => "https",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum GrantHost {
    /// A name, lower-cased.
    Name(String),
    /// `*.suffix`: any name ending in `.suffix`.
    Below(String),
    Address(IpAddr),
}

impl HttpGrant {
    /// Reads a grant as a flow writes it; the error says what is wrong.
    pub fn parse(text: &str) -> Result<HttpGrant, String> {
        let bad = |why: &str| format!("http grant `{text}`: {why}");
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = HttpScheme::parse(scheme)
                    .ok_or_else(|| bad("the scheme must be http or https"))?;
                (Some(scheme), rest)
            }
            None => (None, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty()
            || rest.contains(['/', '?', '#', '@'])
            || rest.chars().any(char::is_whitespace)
        {
            return Err(bad("write a host, `host:port` or `scheme://host:port`, with no path"));
        }
        let (host, port) = split_host_port(rest)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
        let host = if let Ok(address) =
            host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
        {
            GrantHost::Address(address)
        } else if host.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad(
                "not a host name (a name's last label is not a number) nor a whole address",
            ));
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !is_name(suffix) {
                return Err(bad("after `*.` comes a host name"));
            }
            GrantHost::Below(suffix.to_ascii_lowercase())
        } else if is_name(host) {
            GrantHost::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad("not a host name or address (a wildcard is one leading `*.` label)"));
        };
        Ok(HttpGrant { scheme, host, port, text: text.to_owned() })
    }

    /// Whether this grant lets a request reach `scheme://host:port`.
    pub fn allows(&self, scheme: HttpScheme, host: &str, port: u16) -> bool {
        if self.scheme.is_some_and(|s| s != scheme) {
            return false;
        }
        if self.port.unwrap_or(scheme.default_port()) != port {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match &self.host {
            GrantHost::Name(name) => host.eq_ignore_ascii_case(name),
            GrantHost::Below(suffix) => {
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            GrantHost::Address(address) => host.parse::<IpAddr>().is_ok_and(|h| h == *address),
        }
    }

    /// Whether this grant names `address` itself (on `port`, for `scheme`):
    /// the one way a private address may be reached.
    pub fn grants_address(&self, scheme: HttpScheme, address: IpAddr, port: u16) -> bool {
        matches!(&self.host, GrantHost::Address(a) if canonical(*a) == canonical(address))
            && self.scheme.is_none_or(|s| s == scheme)
            && self.port.unwrap_or(scheme.default_port()) == port
    }

    /// The grant as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for HttpGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for HttpGrant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for HttpGrant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HttpGrant::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `address` is one a name must not lead to: loopback, private,
/// link-local, shared (carrier-grade NAT), unspecified, multicast,
/// broadcast, documentation or unique-local.
pub fn is_internal(address: IpAddr) -> bool {
    match canonical(address) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let first = segments[0];
            // An IPv4 address inside a translated form: NAT64 (64:ff9b::/96,
            // 64:ff9b:1::/48) and 6to4 (2002::/16) reach it on the far side.
            let [a, b] = [segments[6], segments[7]].map(u16::to_be_bytes);
            let embedded = |x: [u8; 2], y: [u8; 2]| IpAddr::V4([x[0], x[1], y[0], y[1]].into());
            let translated = match segments {
                [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(embedded(a, b)),
                [0x64, 0xff9b, 1, ..] => Some(embedded(a, b)),
                [0x2002, hi, lo, ..] => Some(embedded(hi.to_be_bytes(), lo.to_be_bytes())),
                _ => None,
            };
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || translated.is_some_and(is_internal)
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is the IPv4 one.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// `host` or `host:port` (`[v6]:port` for an IPv6 address); `None` if the
/// port is not a port.
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0);
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(port(p)?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match text.rsplit_once(':') {
        // A bare IPv6 address has colons but no port.
        Some((host, _)) if host.contains(':') => Some((text, None)),
        Some((host, p)) => Some((host, Some(port(p)?))),
        None => Some((text, None)),
    }
}

/// A DNS name: labels of letters, digits and hyphens (and underscores,
/// which some services use), none empty.
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(text: &str) -> HttpGrant {
        HttpGrant::parse(text).unwrap()
    }

    #[test]
    fn names_and_ports_match_exactly() {
        let g = grant("api.example.com");
        assert!(g.allows(HttpScheme::Https, "api.example.com", 443));
        assert!(g.allows(HttpScheme::Http, "API.example.com", 80));
        assert!(!g.allows(HttpScheme::Https, "api.example.com", 8443));
        assert!(!g.allows(HttpScheme::Https, "x.api.example.com", 443));
        assert!(!g.allows(HttpScheme::Https, "api.example.com.evil.org", 443));
        let g = grant("127.0.0.1:8089");
        assert!(g.allows(HttpScheme::Http, "127.0.0.1", 8089));
        assert!(!g.allows(HttpScheme::Http, "127.0.0.1", 8090));
        assert!(!g.allows(HttpScheme::Http, "localhost", 8089));
    }

    #[test]
    fn a_wildcard_is_one_leading_label_and_a_scheme_narrows() {
        let g = grant("https://*.example.org");
        assert!(g.allows(HttpScheme::Https, "a.example.org", 443));
        assert!(g.allows(HttpScheme::Https, "a.b.example.org", 443));
        assert!(!g.allows(HttpScheme::Https, "example.org", 443));
        assert!(!g.allows(HttpScheme::Https, "badexample.org", 443));
        assert!(!g.allows(HttpScheme::Http, "a.example.org", 80));
        for bad in [
            "*.0.0.1",
            "*.1",
            "10.1",
            "*",
            "a.*.org",
            "http://x/path",
            "ftp://x",
            "x:0",
            "x:70000",
            "user@x",
            "",
            "*.",
        ] {
            assert!(HttpGrant::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn internal_addresses_are_known_in_every_spelling() {
        for internal in [
            "64:ff9b::a00:1",
            "64:ff9b:1::7f00:1",
            "2002:a00:1::1",
            "fec0::1",
            "198.18.0.1",
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn only_an_address_grant_opens_an_internal_address() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(grant("127.0.0.1:8089").grants_address(HttpScheme::Http, loopback, 8089));
        assert!(grant("[::ffff:127.0.0.1]:8089").grants_address(HttpScheme::Http, loopback, 8089));
        assert!(!grant("127.0.0.1:8089").grants_address(HttpScheme::Http, loopback, 9000));
        assert!(!grant("localhost:8089").grants_address(HttpScheme::Http, loopback, 8089));
        assert!(grant("[::1]").grants_address(HttpScheme::Https, "::1".parse().unwrap(), 443));
    }
}
