//! The OVF 1.0 descriptor: one virtual system with EFI firmware, a paravirtual SCSI controller
//! holding the system disk and a blank cache disk, a SATA CD-ROM for the OVF environment ISO, a
//! vmxnet3 NIC, and a ProductSection with the appliance's properties (crate `image` owns the
//! list). Validates against DMTF DSP8023 (`xmllint --schema ovf-envelope.xsd`); VMware's own
//! elements (`vmw:Config`) sit at the schema's `xs:any` points.

use image::properties::{Property, PROPERTIES};

pub const VMDK_FORMAT: &str = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// A deployment size (DeploymentOptionSection): vCPU and memory per configuration.
#[derive(Debug, Clone)]
pub struct Size {
    pub id: &'static str,
    pub label: &'static str,
    pub description: &'static str,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The sizes offered in the wizard; the first is the default.
pub const SIZES: &[Size] = &[
    Size {
        id: "small",
        label: "Small (default)",
        description: "4 vCPU, 8 GiB RAM: up to about 100 protected machines or 40 MB/s of sustained churn.",
        cpus: 4,
        memory_mib: 8192,
    },
    Size {
        id: "medium",
        label: "Medium",
        description: "8 vCPU, 16 GiB RAM: up to about 300 protected machines or 100 MB/s of sustained churn.",
        cpus: 8,
        memory_mib: 16384,
    },
    Size {
        id: "large",
        label: "Large",
        description: "16 vCPU, 32 GiB RAM: up to about 600 protected machines or 200 MB/s of sustained churn.",
        cpus: 16,
        memory_mib: 32768,
    },
];

/// What goes into the descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub name: String,
    pub version: String,
    /// File name of the system disk's VMDK inside the OVA.
    pub system_vmdk: String,
    pub system_vmdk_size: u64,
    /// Virtual size of the system disk in bytes.
    pub system_capacity: u64,
    pub system_populated: u64,
    /// Size of the blank cache/data disk in GiB.
    pub cache_disk_gib: u64,
}

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

fn property_xml(p: &Property) -> String {
    let mut attrs = format!(
        "ovf:key=\"{}\" ovf:type=\"string\" ovf:userConfigurable=\"true\" ovf:value=\"{}\"",
        esc(p.key),
        esc(p.default)
    );
    if !p.qualifiers.is_empty() {
        attrs.push_str(&format!(" ovf:qualifiers=\"{}\"", esc(p.qualifiers)));
    }
    if p.password {
        attrs.push_str(" ovf:password=\"true\"");
    }
    format!(
        "      <Property {attrs}>\n        <Label>{}</Label>\n        <Description>{}</Description>\n      </Property>\n",
        esc(p.label),
        esc(p.description)
    )
}

#[allow(clippy::too_many_arguments)]
fn item(
    required: bool,
    configuration: Option<&str>,
    address: Option<&str>,
    address_on_parent: Option<&str>,
    allocation_units: Option<&str>,
    automatic_allocation: Option<bool>,
    connection: Option<&str>,
    description: &str,
    element_name: &str,
    host_resource: Option<&str>,
    instance_id: u32,
    parent: Option<u32>,
    resource_sub_type: Option<&str>,
    resource_type: u32,
    virtual_quantity: Option<u64>,
) -> String {
    // RASD elements must appear in the schema's (alphabetical) order.
    let mut s = String::from("      <Item");
    if !required {
        s.push_str(" ovf:required=\"false\"");
    }
    if let Some(c) = configuration {
        s.push_str(&format!(" ovf:configuration=\"{c}\""));
    }
    s.push_str(">\n");
    let mut el = |name: &str, v: &str| s.push_str(&format!("        <rasd:{name}>{}</rasd:{name}>\n", esc(v)));
    if let Some(v) = address {
        el("Address", v);
    }
    if let Some(v) = address_on_parent {
        el("AddressOnParent", v);
    }
    if let Some(v) = allocation_units {
        el("AllocationUnits", v);
    }
    if let Some(v) = automatic_allocation {
        el("AutomaticAllocation", if v { "true" } else { "false" });
    }
    if let Some(v) = connection {
        el("Connection", v);
    }
    el("Description", description);
    el("ElementName", element_name);
    if let Some(v) = host_resource {
        el("HostResource", v);
    }
    el("InstanceID", &instance_id.to_string());
    if let Some(v) = parent {
        el("Parent", &v.to_string());
    }
    if let Some(v) = resource_sub_type {
        el("ResourceSubType", v);
    }
    el("ResourceType", &resource_type.to_string());
    if let Some(v) = virtual_quantity {
        el("VirtualQuantity", &v.to_string());
    }
    s.push_str("      </Item>\n");
    s
}

/// Renders the descriptor.
pub fn render(d: &Descriptor) -> String {
    let mut x = String::new();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(
        "<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:cim=\"http://schemas.dmtf.org/wbem/wscim/1/common\" \
         xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" \
         xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" \
         xmlns:vmw=\"http://www.vmware.com/schema/ovf\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n",
    );
    x.push_str(&format!(
        "  <References>\n    <File ovf:href=\"{}\" ovf:id=\"file1\" ovf:size=\"{}\"/>\n  </References>\n",
        esc(&d.system_vmdk),
        d.system_vmdk_size
    ));
    x.push_str(&format!(
        "  <DiskSection>\n    <Info>Virtual disks</Info>\n\
         \x20   <Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"system\" ovf:fileRef=\"file1\" ovf:format=\"{VMDK_FORMAT}\" ovf:populatedSize=\"{}\"/>\n\
         \x20   <Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte * 2^30\" ovf:diskId=\"cache\" ovf:format=\"{VMDK_FORMAT}\"/>\n\
         \x20 </DiskSection>\n",
        d.system_capacity, d.system_populated, d.cache_disk_gib
    ));
    x.push_str(
        "  <NetworkSection>\n    <Info>Logical networks</Info>\n    <Network ovf:name=\"VM Network\">\n\
         \x20     <Description>The network agents, operators and blob storage reach the appliance on</Description>\n\
         \x20   </Network>\n  </NetworkSection>\n",
    );
    x.push_str("  <DeploymentOptionSection>\n    <Info>Appliance sizes</Info>\n");
    for (i, s) in SIZES.iter().enumerate() {
        let default = if i == 0 { " ovf:default=\"true\"" } else { "" };
        x.push_str(&format!(
            "    <Configuration ovf:id=\"{}\"{default}>\n      <Label>{}</Label>\n      <Description>{}</Description>\n    </Configuration>\n",
            s.id,
            esc(s.label),
            esc(s.description)
        ));
    }
    x.push_str("  </DeploymentOptionSection>\n");
    x.push_str(&format!(
        "  <VirtualSystem ovf:id=\"{name}\">\n    <Info>{name} disaster-recovery appliance</Info>\n    <Name>{name}</Name>\n",
        name = esc(&d.name)
    ));
    x.push_str(&format!(
        "    <AnnotationSection>\n      <Info>Description</Info>\n      <Annotation>{} {}: process server, configuration server and master target in one VM. \
         Ports: management HTTPS 443, replication HTTPS 9443, NBD 10809, metrics HTTP 9464. \
         The second disk holds the write-ahead cache and is formatted on first boot.</Annotation>\n    </AnnotationSection>\n",
        esc(&d.name),
        esc(&d.version)
    ));
    x.push_str(&format!(
        "    <ProductSection ovf:required=\"false\">\n      <Info>Appliance settings, read on every boot</Info>\n\
         \x20     <Product>{name}</Product>\n      <Vendor>The Lifeboat project</Vendor>\n      <Version>{v}</Version>\n      <FullVersion>{v}</FullVersion>\n",
        name = esc(&d.name),
        v = esc(&d.version)
    ));
    let mut category = "";
    for p in PROPERTIES {
        if p.category != category {
            category = p.category;
            x.push_str(&format!("      <Category>{}</Category>\n", esc(category)));
        }
        x.push_str(&property_xml(p));
    }
    x.push_str("    </ProductSection>\n");
    x.push_str(
        "    <OperatingSystemSection ovf:id=\"96\" vmw:osType=\"debian10_64Guest\">\n      <Info>Guest operating system</Info>\n\
         \x20     <Description>Debian GNU/Linux 12 kernel with the Lifeboat init (64-bit)</Description>\n    </OperatingSystemSection>\n",
    );
    x.push_str(
        "    <VirtualHardwareSection ovf:transport=\"iso com.vmware.guestInfo\">\n      <Info>Virtual hardware requirements</Info>\n      <System>\n\
         \x20       <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        <vssd:InstanceID>0</vssd:InstanceID>\n\
         \x20       <vssd:VirtualSystemIdentifier>lifeboat</vssd:VirtualSystemIdentifier>\n        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>\n      </System>\n",
    );
    let mut id = 1u32;
    for s in SIZES {
        x.push_str(&item(
            true,
            Some(s.id),
            None,
            None,
            Some("hertz * 10^6"),
            None,
            None,
            "Number of virtual CPUs",
            &format!("{} virtual CPU(s)", s.cpus),
            None,
            id,
            None,
            None,
            3,
            Some(u64::from(s.cpus)),
        ));
        x.push_str(&item(
            true,
            Some(s.id),
            None,
            None,
            Some("byte * 2^20"),
            None,
            None,
            "Memory size",
            &format!("{} MB of memory", s.memory_mib),
            None,
            id + 1,
            None,
            None,
            4,
            Some(s.memory_mib),
        ));
        id += 2;
    }
    let scsi = id;
    x.push_str(&item(
        true,
        None,
        Some("0"),
        None,
        None,
        None,
        None,
        "SCSI controller (VMware paravirtual)",
        "SCSI controller 0",
        None,
        scsi,
        None,
        Some("VirtualSCSI"),
        6,
        None,
    ));
    let sata = scsi + 1;
    x.push_str(&item(
        true,
        None,
        Some("0"),
        None,
        None,
        None,
        None,
        "SATA controller for the OVF environment CD-ROM",
        "SATA controller 0",
        None,
        sata,
        None,
        Some("vmware.sata.ahci"),
        20,
        None,
    ));
    x.push_str(&item(
        true,
        None,
        None,
        Some("0"),
        None,
        None,
        None,
        "System disk: boot loader, kernel and the appliance",
        "Hard disk 1",
        Some("ovf:/disk/system"),
        sata + 1,
        Some(scsi),
        None,
        17,
        None,
    ));
    x.push_str(&item(
        true,
        None,
        None,
        Some("1"),
        None,
        None,
        None,
        "Cache and data disk: write-ahead cache, RocksDB, TLS and keys (formatted on first boot)",
        "Hard disk 2",
        Some("ovf:/disk/cache"),
        sata + 2,
        Some(scsi),
        None,
        17,
        None,
    ));
    x.push_str(&item(
        false,
        None,
        None,
        Some("0"),
        None,
        Some(false),
        None,
        "CD-ROM for the OVF environment (ISO transport)",
        "CD/DVD drive 1",
        None,
        sata + 3,
        Some(sata),
        Some("vmware.cdrom.remotepassthrough"),
        15,
        None,
    ));
    x.push_str(&item(
        true,
        None,
        None,
        Some("7"),
        None,
        Some(true),
        Some("VM Network"),
        "VMXNET3 ethernet adapter on \"VM Network\"",
        "Network adapter 1",
        None,
        sata + 4,
        None,
        Some("VmxNet3"),
        10,
        None,
    ));
    x.push_str(&item(
        false,
        None,
        None,
        None,
        None,
        Some(false),
        None,
        "Video card",
        "Video card",
        None,
        sata + 5,
        None,
        None,
        24,
        None,
    ));
    for (k, v) in [
        ("firmware", "efi"),
        ("uefi.secureBoot.enabled", "false"),
        ("powerOpInfo.powerOffType", "hard"),
        ("powerOpInfo.resetType", "hard"),
    ] {
        x.push_str(&format!(
            "      <vmw:Config ovf:required=\"false\" vmw:key=\"{k}\" vmw:value=\"{v}\"/>\n"
        ));
    }
    x.push_str("    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n");
    x
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The DMTF schema folder, ../shared/ovf-schema from the repository root.
    pub fn schema_dir() -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("../shared/ovf-schema");
        assert!(
            dir.join("ovf-envelope.xsd").exists(),
            "the DMTF OVF schema is missing at {}",
            dir.display()
        );
        dir
    }

    fn sample() -> Descriptor {
        Descriptor {
            name: "Lifeboat".into(),
            version: "0.1.0".into(),
            system_vmdk: "lifeboat-system.vmdk".into(),
            system_vmdk_size: 12345,
            system_capacity: 256 << 20,
            system_populated: 64 << 20,
            cache_disk_gib: 256,
        }
    }

    pub fn xmllint_validates(path: &std::path::Path) -> Result<(), String> {
        let out = std::process::Command::new("xmllint")
            .arg("--noout")
            .arg("--schema")
            .arg(schema_dir().join("ovf-envelope.xsd"))
            .arg(path)
            .output()
            .expect("xmllint must be installed (.ci/setup installs libxml2-utils)");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[test]
    fn descriptor_validates_against_the_dmtf_schema() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lifeboat.ovf");
        std::fs::write(&p, render(&sample())).unwrap();
        xmllint_validates(&p).unwrap();
    }

    #[test]
    fn the_schema_check_catches_a_broken_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.ovf");
        // RASD elements out of order and a Disk without a capacity.
        let bad = render(&sample())
            .replace("<rasd:Description>Memory size</rasd:Description>", "")
            .replacen("ovf:capacity=\"256\" ", "", 1)
            .replace(
                "</rasd:ElementName>",
                "</rasd:ElementName><rasd:Address>9</rasd:Address>",
            );
        std::fs::write(&p, bad).unwrap();
        assert!(xmllint_validates(&p).is_err());
    }

    #[test]
    fn descriptor_has_what_esxi_needs() {
        let x = render(&sample());
        for needle in [
            "vmx-14",
            "vmw:key=\"firmware\" vmw:value=\"efi\"",
            "<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>",
            "<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>",
            "ovf:transport=\"iso com.vmware.guestInfo\"",
            "ovf:diskId=\"cache\" ovf:format",
            "ovf:key=\"passphrase\"",
            "ovf:password=\"true\"",
            "ovf:key=\"blob_url\"",
            "ovf:key=\"ip0\"",
        ] {
            assert!(x.contains(needle), "descriptor lacks {needle}");
        }
        // The cache disk has no file.
        let cache = x.lines().find(|l| l.contains("ovf:diskId=\"cache\"")).unwrap();
        assert!(!cache.contains("fileRef"));
    }
}
