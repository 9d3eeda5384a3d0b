//! Routing: from an MX answer to the ordered list of hosts to try (RFC 5321 5.1,
//! RFC 7505), and recipients grouped by destination domain.

use crate::address;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    pub exchange: String,
}

/// The answer to an MX query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    Records(Vec<MxRecord>),
    NoRecords,
    NxDomain,
    Temporary(String),
}

/// The answer to an address (A and AAAA) query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressAnswer {
    Addresses(Vec<String>),
    NoRecords,
    NxDomain,
    Temporary(String),
}

/// Hosts to try for one domain, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryPlan {
    pub domain: String,
    pub hosts: Vec<String>,
    pub implicit_mx: bool,
}

/// A failure that ends (permanent) or defers an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub permanent: bool,
    /// Enhanced status code (RFC 3463).
    pub status: String,
    pub text: String,
}

impl Failure {
    /// A failure worth retrying.
    pub fn temporary(status: &str, text: impl Into<String>) -> Self {
        Failure {
            permanent: false,
            status: status.to_string(),
            text: text.into(),
        }
    }

    /// A failure that retrying cannot cure.
    pub fn permanent(status: &str, text: impl Into<String>) -> Self {
        Failure {
            permanent: true,
            status: status.to_string(),
            text: text.into(),
        }
    }
}

fn is_null_mx(record: &MxRecord) -> bool {
    let exchange = record.exchange.trim();
    exchange.is_empty() || exchange == "."
}

/// Order the exchangers of `domain`: lowest preference first, equal
/// preferences shuffled with `seed` (RFC 5321 5.1 asks for random order so
/// that load spreads), duplicates removed.
pub fn plan_delivery(domain: &str, answer: &MxAnswer, seed: u64) -> Result<DeliveryPlan, Failure> {
    let domain = domain.trim_end_matches('.').to_lowercase();
    match answer {
        MxAnswer::NxDomain => Err(Failure::permanent(
            "5.1.2",
            format!("the domain {domain} does not exist (DNS answered NXDOMAIN)"),
        )),
        MxAnswer::Temporary(why) => Err(Failure::temporary(
            "4.4.3",
            format!("the MX lookup for {domain} failed: {why}"),
        )),
        MxAnswer::NoRecords => Ok(DeliveryPlan {
            hosts: vec![domain.clone()],
            domain,
            implicit_mx: true,
        }),
        MxAnswer::Records(records) if records.iter().any(is_null_mx) => Err(Failure::permanent(
            "5.1.10",
            format!("the domain {domain} accepts no mail (null MX, RFC 7505)"),
        )),
        MxAnswer::Records(records) if records.is_empty() => Ok(DeliveryPlan {
            hosts: vec![domain.clone()],
            domain,
            implicit_mx: true,
        }),
        MxAnswer::Records(records) => {
            let mut rng = SplitMix64(seed);
            let mut keyed: Vec<(u16, u64, String)> = records
                .iter()
                .map(|r| {
                    (
                        r.preference,
                        rng.next(),
                        r.exchange.trim_end_matches('.').to_lowercase(),
                    )
                })
                .collect();
            keyed.sort();
            let mut hosts: Vec<String> = Vec::with_capacity(keyed.len());
            for (_, _, host) in keyed {
                if !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
            Ok(DeliveryPlan {
                domain,
                hosts,
                implicit_mx: false,
            })
        }
    }
}

/// Recipients grouped by domain, domains in first-seen order.
pub fn group_by_domain(recipients: &[String]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for recipient in recipients {
        let domain = address::domain_of(recipient).unwrap_or_default();
        match groups.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, list)) => list.push(recipient.clone()),
            None => groups.push((domain, vec![recipient.clone()])),
        }
    }
    groups
}

/// Whether and how to use STARTTLS toward a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text only.
    None,
    /// When offered; plain text if the handshake fails before any mail data.
    Opportunistic,
    /// Always (defer otherwise); the certificate is not checked.
    Required,
    /// Always, with certificate and host name checks.
    Verify,
}

impl TlsMode {
    /// The name used in configuration and output.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Required => "required",
            TlsMode::Verify => "verify",
        }
    }
}

/// SMTP AUTH credentials. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: <hidden> }}",
            self.username
        )
    }
}

/// A fixed next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    pub hosts: Vec<String>,
    pub port: u16,
    pub tls: TlsMode,
    pub credentials: Option<Credentials>,
}

/// A route for a domain (`example.com`) or its subdomains (`*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRoute {
    pub domain: String,
    pub hop: NextHop,
}

/// The operator's routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub local_domains: Vec<String>,
    pub routes: Vec<DomainRoute>,
    pub smarthost: Option<NextHop>,
    pub mx_tls: TlsMode,
    pub masquerade_domain: Option<String>,
}

impl Default for Routing {
    /// Everything by MX, opportunistic TLS, no local domains.
    fn default() -> Self {
        Routing {
            local_domains: Vec::new(),
            routes: Vec::new(),
            smarthost: None,
            mx_tls: TlsMode::Opportunistic,
            masquerade_domain: None,
        }
    }
}

/// Where the mail of one domain goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChoice {
    LocalDrop,
    /// A fixed next hop, and the rule that chose it.
    Fixed(String, NextHop),
    Mx(TlsMode),
}

fn domain_matches(pattern: &str, domain: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_lowercase();
    match pattern.strip_prefix("*.") {
        Some(parent) => domain.len() > parent.len() + 1 && domain.ends_with(&format!(".{parent}")),
        None => pattern == domain,
    }
}

/// Local domains first, then the first matching route, then the smart host, then MX.
pub fn choose_route(domain: &str, routing: &Routing) -> RouteChoice {
    let domain = domain.trim_end_matches('.').to_lowercase();
    if routing
        .local_domains
        .iter()
        .any(|local| domain_matches(local, &domain))
    {
        return RouteChoice::LocalDrop;
    }
    if let Some(route) = routing
        .routes
        .iter()
        .find(|r| domain_matches(&r.domain, &domain))
    {
        return RouteChoice::Fixed(format!("route {}", route.domain), route.hop.clone());
    }
    if let Some(smarthost) = &routing.smarthost {
        return RouteChoice::Fixed("smarthost".into(), smarthost.clone());
    }
    RouteChoice::Mx(routing.mx_tls)
}

/// A small deterministic generator: the caller picks the seed, so tests can
/// pin the order and production can pass real randomness.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(preference: u16, exchange: &str) -> MxRecord {
        MxRecord {
            preference,
            exchange: exchange.to_string(),
        }
    }

    #[test]
    fn lowest_preference_first() {
        let answer = MxAnswer::Records(vec![
            mx(20, "b.example."),
            mx(10, "A.example."),
            mx(30, "c.example"),
        ]);
        let plan = plan_delivery("Example.com", &answer, 1).unwrap();
        assert_eq!(plan.hosts, vec!["a.example", "b.example", "c.example"]);
        assert_eq!(plan.domain, "example.com");
        assert!(!plan.implicit_mx);
    }

    #[test]
    fn equal_preferences_are_shuffled_by_seed() {
        let answer = MxAnswer::Records((0..8).map(|i| mx(10, &format!("mx{i}.example"))).collect());
        let orders: std::collections::HashSet<Vec<String>> = (0..20)
            .map(|seed| plan_delivery("x.example", &answer, seed).unwrap().hosts)
            .collect();
        assert!(
            orders.len() > 1,
            "the seed must change the order of equal preferences"
        );
        let again = plan_delivery("x.example", &answer, 7).unwrap();
        assert_eq!(again, plan_delivery("x.example", &answer, 7).unwrap());
    }

    #[test]
    fn no_mx_means_implicit_mx() {
        let plan = plan_delivery("aonly.example", &MxAnswer::NoRecords, 0).unwrap();
        assert_eq!(
            (plan.hosts, plan.implicit_mx),
            (vec!["aonly.example".to_string()], true)
        );
    }

    #[test]
    fn null_mx_and_nxdomain_are_permanent_servfail_temporary() {
        let null = plan_delivery("n.example", &MxAnswer::Records(vec![mx(0, ".")]), 0).unwrap_err();
        assert!(null.permanent && null.status == "5.1.10");
        let nx = plan_delivery("nx.example", &MxAnswer::NxDomain, 0).unwrap_err();
        assert!(nx.permanent && nx.status == "5.1.2");
        let temp =
            plan_delivery("t.example", &MxAnswer::Temporary("SERVFAIL".into()), 0).unwrap_err();
        assert!(!temp.permanent && temp.text.contains("SERVFAIL"));
    }

    fn hop(host: &str) -> NextHop {
        NextHop {
            hosts: vec![host.into()],
            port: 25,
            tls: TlsMode::Verify,
            credentials: None,
        }
    }

    #[test]
    fn route_precedence() {
        let routing = Routing {
            local_domains: vec!["intranet.example".into()],
            routes: vec![
                DomainRoute {
                    domain: "*.partner.example".into(),
                    hop: hop("gw.partner.example"),
                },
                DomainRoute {
                    domain: "partner.example".into(),
                    hop: hop("mx.partner.example"),
                },
            ],
            smarthost: Some(hop("smarthost.example")),
            ..Routing::default()
        };
        assert_eq!(
            choose_route("Intranet.Example", &routing),
            RouteChoice::LocalDrop
        );
        assert_eq!(
            choose_route("a.partner.example", &routing),
            RouteChoice::Fixed("route *.partner.example".into(), hop("gw.partner.example"))
        );
        assert_eq!(
            choose_route("partner.example", &routing),
            RouteChoice::Fixed("route partner.example".into(), hop("mx.partner.example"))
        );
        assert_eq!(
            choose_route("xpartner.example", &routing),
            RouteChoice::Fixed("smarthost".into(), hop("smarthost.example"))
        );
        assert_eq!(
            choose_route("other.example", &Routing::default()),
            RouteChoice::Mx(TlsMode::Opportunistic)
        );
        let secret = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn grouping_keeps_order_and_folds_case() {
        let rcpts: Vec<String> = ["a@x.example", "b@y.example", "c@X.Example"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let groups = group_by_domain(&rcpts);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0],
            (
                "x.example".to_string(),
                vec!["a@x.example".to_string(), "c@X.Example".to_string()]
            )
        );
    }
}
