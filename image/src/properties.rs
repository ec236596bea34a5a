//! The OVF properties the appliance reads on first boot: one table shared by the OVF descriptor's
//! ProductSection (crate `ova`) and the init that applies them, so a key cannot drift between
//! the two.

/// One user-configurable property as the vSphere deploy wizard shows it.
#[derive(Debug, Clone, Copy)]
pub struct Property {
    /// `ovf:key`, also the suffix of the `guestinfo.` key VMware exposes.
    pub key: &'static str,
    /// The wizard's group (`Category` element before the first property of a group).
    pub category: &'static str,
    pub label: &'static str,
    pub description: &'static str,
    /// Default value (empty: not set).
    pub default: &'static str,
    /// `ovf:qualifiers`, e.g. `MaxLen(253)`.
    pub qualifiers: &'static str,
    /// Shown as a password field and never echoed on the console.
    pub password: bool,
}

const fn p(
    key: &'static str,
    category: &'static str,
    label: &'static str,
    description: &'static str,
    default: &'static str,
    qualifiers: &'static str,
    password: bool,
) -> Property {
    Property {
        key,
        category,
        label,
        description,
        default,
        qualifiers,
        password,
    }
}

pub const HOSTNAME: &str = "hostname";
pub const IP: &str = "ip0";
pub const NETMASK: &str = "netmask0";
pub const GATEWAY: &str = "gateway";
pub const DNS: &str = "dns";
pub const PASSPHRASE: &str = "passphrase";
pub const BLOB_URL: &str = "blob_url";
pub const BLOB_ACCOUNT: &str = "blob_account";
pub const BLOB_SECRET: &str = "blob_secret";
pub const BLOB_ENDPOINT: &str = "blob_endpoint";
pub const BLOB_OPTIONS: &str = "blob_options";

/// Every property, in the order the wizard lists them.
pub const PROPERTIES: &[Property] = &[
    p(
        HOSTNAME,
        "Network",
        "Hostname",
        "The appliance's host name; it is also put in the TLS certificate.",
        "lifeboat",
        "MinLen(1) MaxLen(63)",
        false,
    ),
    p(
        IP,
        "Network",
        "IP address",
        "Static IPv4 address of the appliance. Leave empty to use DHCP.",
        "",
        "MaxLen(15)",
        false,
    ),
    p(
        NETMASK,
        "Network",
        "Netmask",
        "Netmask for the static address, dotted (255.255.255.0) or as a prefix length (24). Ignored with DHCP.",
        "",
        "MaxLen(15)",
        false,
    ),
    p(
        GATEWAY,
        "Network",
        "Default gateway",
        "Default gateway for the static address. Ignored with DHCP.",
        "",
        "MaxLen(15)",
        false,
    ),
    p(
        DNS,
        "Network",
        "DNS servers",
        "Comma-separated DNS server addresses. Ignored with DHCP unless set.",
        "",
        "MaxLen(255)",
        false,
    ),
    p(
        PASSPHRASE,
        "Security",
        "Registration passphrase",
        "Agents present this passphrase to register; the appliance derives its encryption keys from it. Keep it: \
         recovery from blob storage needs it. Leave empty to have a random one generated on first boot.",
        "",
        "MaxLen(1024)",
        true,
    ),
    p(
        BLOB_URL,
        "Blob storage",
        "Blob storage URL",
        "Where recovery data is kept: az://CONTAINER (Azure Blob) or s3://BUCKET (Amazon S3 or compatible). \
         Leave empty to keep it on the appliance's cache disk (for evaluation only).",
        "",
        "MaxLen(1024)",
        false,
    ),
    p(
        BLOB_ACCOUNT,
        "Blob storage",
        "Storage account / access key ID",
        "Azure storage account name, or the S3 access key ID.",
        "",
        "MaxLen(256)",
        false,
    ),
    p(
        BLOB_SECRET,
        "Blob storage",
        "Storage account key / secret access key",
        "Azure storage account key, or the S3 secret access key.",
        "",
        "MaxLen(1024)",
        true,
    ),
    p(
        BLOB_ENDPOINT,
        "Blob storage",
        "Storage endpoint (optional)",
        "Endpoint URL for Azure Stack, an S3-compatible service or an emulator. Leave empty for the public cloud.",
        "",
        "MaxLen(1024)",
        false,
    ),
    p(
        BLOB_OPTIONS,
        "Blob storage",
        "Advanced storage options (optional)",
        "Further object_store options as key=value pairs separated by semicolons, e.g. aws_region=eu-west-1.",
        "",
        "MaxLen(4096)",
        false,
    ),
];

/// Looks a property up by key.
pub fn property(key: &str) -> Option<&'static Property> {
    PROPERTIES.iter().find(|p| p.key == key)
}
