//! First-boot decisions, kept free of I/O so they are unit-tested: reading the OVF environment,
//! turning properties into a network plan and the `lifeboat` TOML config, and saying plainly
//! what was wrong with a value (the appliance then goes on with a safe default).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::properties as p;

/// Properties by key, from `ovf-env.xml` or guestinfo.
pub type Props = BTreeMap<String, String>;

/// Reads the `<Property oe:key=".." oe:value=".."/>` entries of an OVF environment document.
pub fn parse_ovf_env(xml: &str) -> Result<Props, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("ovf-env.xml is not well-formed XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Environment" {
        return Err(format!(
            "ovf-env.xml: the root element is <{}>, not <Environment>",
            root.tag_name().name()
        ));
    }
    let attr =
        |n: roxmltree::Node, name: &str| n.attributes().find(|a| a.name() == name).map(|a| a.value().to_string());
    let mut props = Props::new();
    for n in root.descendants().filter(|n| n.tag_name().name() == "Property") {
        let key = attr(n, "key").ok_or("ovf-env.xml: a <Property> has no key")?;
        props.insert(key, attr(n, "value").unwrap_or_default());
    }
    Ok(props)
}

/// How the NIC gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    Dhcp,
    Static {
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
    },
}

/// Where the data dir lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blob {
    /// `file://DATA_DIR/blob` on the cache disk.
    Local,
    Remote {
        url: String,
        options: BTreeMap<String, String>,
    },
}

/// What the init applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub hostname: String,
    pub network: Network,
    pub dns: Vec<Ipv4Addr>,
    pub passphrase: Option<String>,
    pub blob: Blob,
    /// Plain-language problems with the given values, for the console.
    pub problems: Vec<String>,
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

/// Netmask as dotted quad or prefix length.
pub fn parse_netmask(s: &str) -> Option<u8> {
    let s = s.trim().trim_start_matches('/');
    if let Ok(n) = s.parse::<u8>() {
        return (n <= 32).then_some(n);
    }
    let m = u32::from(s.parse::<Ipv4Addr>().ok()?);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// Decides everything from the properties; never fails.
pub fn plan(props: &Props) -> Plan {
    let mut problems = Vec::new();
    let get = |k: &str| props.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());

    let hostname = match get(p::HOSTNAME) {
        None => "lifeboat".to_string(),
        Some(h) if valid_hostname(&h) => h.to_ascii_lowercase(),
        Some(h) => {
            problems.push(format!(
                "property {}: {h:?} is not a valid host name (letters, digits and '-', at most 63); using \"lifeboat\"",
                p::HOSTNAME
            ));
            "lifeboat".to_string()
        }
    };

    let network = match get(p::IP) {
        None => Network::Dhcp,
        Some(ip) => match ip.parse::<Ipv4Addr>() {
            Err(_) => {
                problems.push(format!(
                    "property {}: {ip:?} is not an IPv4 address; using DHCP instead",
                    p::IP
                ));
                Network::Dhcp
            }
            Ok(ip) => {
                let prefix = match get(p::NETMASK) {
                    None => {
                        problems.push(format!(
                            "property {} is empty while {} is set; assuming 255.255.255.0",
                            p::NETMASK,
                            p::IP
                        ));
                        24
                    }
                    Some(m) => parse_netmask(&m).unwrap_or_else(|| {
                        problems.push(format!(
                            "property {}: {m:?} is neither a netmask nor a prefix length; assuming 255.255.255.0",
                            p::NETMASK
                        ));
                        24
                    }),
                };
                let gateway = get(p::GATEWAY).and_then(|g| match g.parse() {
                    Ok(g) => Some(g),
                    Err(_) => {
                        problems.push(format!(
                            "property {}: {g:?} is not an IPv4 address; no default route",
                            p::GATEWAY
                        ));
                        None
                    }
                });
                Network::Static { ip, prefix, gateway }
            }
        },
    };

    let mut dns = Vec::new();
    for d in get(p::DNS)
        .unwrap_or_default()
        .split([',', ' ', ';'])
        .filter(|s| !s.is_empty())
    {
        match d.parse() {
            Ok(a) => dns.push(a),
            Err(_) => problems.push(format!("property {}: {d:?} is not an IPv4 address; left out", p::DNS)),
        }
    }

    let passphrase = props.get(p::PASSPHRASE).filter(|s| !s.is_empty()).cloned();

    let blob = match get(p::BLOB_URL) {
        None => Blob::Local,
        Some(url) => {
            let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            let kind = match scheme.as_deref() {
                Some("az" | "azure" | "abfs" | "abfss" | "adl") => Some("azure"),
                Some("s3" | "s3a") => Some("s3"),
                Some("https") if url.contains(".blob.core.windows.net") => Some("azure"),
                Some("file") => Some("file"),
                _ => None,
            };
            match kind {
                None => {
                    problems.push(format!(
                        "property {}: {url:?} is not az://CONTAINER or s3://BUCKET; keeping recovery data on the cache disk",
                        p::BLOB_URL
                    ));
                    Blob::Local
                }
                Some(kind) => {
                    let mut options = BTreeMap::new();
                    let endpoint = get(p::BLOB_ENDPOINT);
                    let (acct, secret, ep, http) = match kind {
                        "azure" => (
                            "azure_storage_account_name",
                            "azure_storage_account_key",
                            "azure_storage_endpoint",
                            "azure_allow_http",
                        ),
                        _ => (
                            "aws_access_key_id",
                            "aws_secret_access_key",
                            "aws_endpoint",
                            "aws_allow_http",
                        ),
                    };
                    if kind != "file" {
                        if let Some(a) = get(p::BLOB_ACCOUNT) {
                            options.insert(acct.to_string(), a);
                        }
                        if let Some(s) = props.get(p::BLOB_SECRET).filter(|s| !s.is_empty()) {
                            options.insert(secret.to_string(), s.clone());
                        }
                        if let Some(e) = endpoint {
                            if e.starts_with("http://") {
                                options.insert(http.to_string(), "true".into());
                            }
                            options.insert(ep.to_string(), e);
                        }
                    }
                    for pair in get(p::BLOB_OPTIONS)
                        .unwrap_or_default()
                        .split(';')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                    {
                        match pair.split_once('=') {
                            Some((k, v)) if !k.trim().is_empty() => {
                                options.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                            }
                            _ => problems.push(format!(
                                "property {}: {pair:?} is not key=value; left out",
                                p::BLOB_OPTIONS
                            )),
                        }
                    }
                    Blob::Remote { url, options }
                }
            }
        }
    };

    Plan {
        hostname,
        network,
        dns,
        passphrase,
        blob,
        problems,
    }
}

/// Quotes a TOML basic string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The appliance's `lifeboat serve` config: all roles on the appliance ports.
pub fn config_toml(plan: &Plan, data_dir: &str, cache_max_bytes: u64, san: &[String]) -> String {
    let mut t = String::new();
    t.push_str("# Written by the Lifeboat init on every boot from the OVF properties; edits are lost.\n");
    t.push_str(&format!("data_dir = {}\n", q(data_dir)));
    t.push_str("roles = [\"config\", \"process\", \"master-target\"]\n\n");
    t.push_str(
        "[listen]\nmanagement = \"0.0.0.0:443\"\nreplication = \"0.0.0.0:9443\"\nnbd = \"0.0.0.0:10809\"\nmetrics = \"0.0.0.0:9464\"\n\n",
    );
    let sans: Vec<String> = san.iter().map(|s| q(s)).collect();
    t.push_str(&format!(
        "[tls]\ncert = \"DATA_DIR/tls/cert.pem\"\nkey = \"DATA_DIR/tls/key.pem\"\nsan = [{}]\n\n",
        sans.join(", ")
    ));
    t.push_str("[security]\npassphrase_file = \"DATA_DIR/passphrase\"\n\n");
    match &plan.blob {
        Blob::Local => t.push_str("[blob]\nurl = \"file://DATA_DIR/blob\"\n\n"),
        Blob::Remote { url, options } => {
            t.push_str(&format!("[blob]\nurl = {}\n", q(url)));
            if !options.is_empty() {
                t.push_str("[blob.options]\n");
                for (k, v) in options {
                    t.push_str(&format!("{} = {}\n", q(k), q(v)));
                }
            }
            t.push('\n');
        }
    }
    t.push_str(&format!("[cache]\nmax_bytes = \"{cache_max_bytes}\"\n"));
    t
}

/// The write-ahead cache limit for a data filesystem of `fs_bytes`: 80 %, at least 64 MiB.
pub fn cache_limit(fs_bytes: u64) -> u64 {
    (fs_bytes / 10 * 8).max(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv" oe:id="" ve:vCenterId="vm-1">
   <PlatformSection><Kind>VMware ESXi</Kind></PlatformSection>
   <PropertySection>
         <Property oe:key="hostname" oe:value="dr-site-a"/>
         <Property oe:key="ip0" oe:value="192.168.10.5"/>
         <Property oe:key="netmask0" oe:value="255.255.255.0"/>
         <Property oe:key="gateway" oe:value="192.168.10.1"/>
         <Property oe:key="dns" oe:value="192.168.10.2, 9.9.9.9"/>
         <Property oe:key="passphrase" oe:value="s3cret &amp; long"/>
         <Property oe:key="blob_url" oe:value="az://recovery"/>
         <Property oe:key="blob_account" oe:value="acct"/>
         <Property oe:key="blob_secret" oe:value="a2V5"/>
         <Property oe:key="blob_endpoint" oe:value="http://10.0.2.2:10000/acct"/>
   </PropertySection>
</Environment>"#;

    #[test]
    fn vsphere_environment_becomes_a_static_plan_and_a_config() {
        let props = parse_ovf_env(ENV).unwrap();
        assert_eq!(props["passphrase"], "s3cret & long");
        let pl = plan(&props);
        assert!(pl.problems.is_empty(), "{:?}", pl.problems);
        assert_eq!(pl.hostname, "dr-site-a");
        assert_eq!(
            pl.network,
            Network::Static {
                ip: "192.168.10.5".parse().unwrap(),
                prefix: 24,
                gateway: Some("192.168.10.1".parse().unwrap())
            }
        );
        assert_eq!(pl.dns.len(), 2);
        let toml_text = config_toml(
            &pl,
            "/data/lifeboat",
            1 << 30,
            &["dr-site-a".into(), "192.168.10.5".into()],
        );
        let v: toml::Value = toml::from_str(&toml_text).unwrap();
        assert_eq!(v["blob"]["url"].as_str(), Some("az://recovery"));
        assert_eq!(
            v["blob"]["options"]["azure_storage_account_name"].as_str(),
            Some("acct")
        );
        assert_eq!(v["blob"]["options"]["azure_allow_http"].as_str(), Some("true"));
        assert_eq!(v["listen"]["management"].as_str(), Some("0.0.0.0:443"));
        assert_eq!(v["cache"]["max_bytes"].as_str(), Some("1073741824"));
        assert_eq!(v["tls"]["san"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn bad_values_are_named_and_safe_defaults_used() {
        let mut props = Props::new();
        props.insert("hostname".into(), "bad_name!".into());
        props.insert("ip0".into(), "10.0.0.300".into());
        props.insert("dns".into(), "1.1.1.1,nope".into());
        props.insert("blob_url".into(), "ftp://x".into());
        props.insert("blob_options".into(), "novalue".into());
        let pl = plan(&props);
        assert_eq!(pl.hostname, "lifeboat");
        assert_eq!(pl.network, Network::Dhcp);
        assert_eq!(pl.dns, vec!["1.1.1.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(pl.blob, Blob::Local);
        let all = pl.problems.join("\n");
        for k in ["hostname", "ip0", "dns", "blob_url"] {
            assert!(all.contains(&format!("property {k}")), "{all}");
        }
    }

    #[test]
    fn empty_environment_means_dhcp_and_local_blob() {
        let pl = plan(&Props::new());
        assert_eq!(pl.network, Network::Dhcp);
        assert_eq!(pl.blob, Blob::Local);
        assert!(pl.problems.is_empty());
    }

    #[test]
    fn broken_xml_is_a_clear_error() {
        let e = parse_ovf_env("<Environment><PropertySection>").unwrap_err();
        assert!(e.contains("ovf-env.xml"), "{e}");
    }

    #[test]
    fn netmasks() {
        assert_eq!(parse_netmask("255.255.255.0"), Some(24));
        assert_eq!(parse_netmask("24"), Some(24));
        assert_eq!(parse_netmask("/16"), Some(16));
        assert_eq!(parse_netmask("255.0.255.0"), None);
        assert_eq!(parse_netmask("33"), None);
        assert_eq!(cache_limit(10 << 30), 8 << 30);
    }
}
