"""Writes an OVA (OVF 1.0 descriptor, SHA-256 manifest, streamOptimized VMDK) for the
appliance, for VMware ESXi/Workstation and VirtualBox.

    python3 image/ova.py DISK.vmdk CAPACITY_BYTES VERSION OUT.ova
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from xml.sax.saxutils import escape

# What the OVA asks of the hypervisor; an admin may give the VM more.
CPUS = 2
MEMORY_MIB = 4096

_ITEM = """      <Item>
{fields}
      </Item>"""


def _item(**fields: str) -> str:
    # CIM requires the rasd elements of an Item in alphabetical order (VMware checks it).
    lines = [
        f"        <rasd:{name}>{escape(value)}</rasd:{name}>"
        for name, value in sorted(fields.items())
    ]
    return _ITEM.format(fields="\n".join(lines))


def descriptor(vmdk_name: str, vmdk_size: int, capacity: int, version: str) -> str:
    """The OVF envelope: one VM, one disk on an LSI Logic SCSI controller, one E1000 NIC."""
    items = [
        _item(
            AllocationUnits="hertz * 10^6",
            Description="Number of virtual CPUs",
            ElementName=f"{CPUS} virtual CPU(s)",
            InstanceID="1",
            ResourceType="3",
            VirtualQuantity=str(CPUS),
        ),
        _item(
            AllocationUnits="byte * 2^20",
            Description="Memory size",
            ElementName=f"{MEMORY_MIB}MB of memory",
            InstanceID="2",
            ResourceType="4",
            VirtualQuantity=str(MEMORY_MIB),
        ),
        _item(
            Address="0",
            Description="SCSI Controller",
            ElementName="SCSI Controller 0",
            InstanceID="3",
            ResourceSubType="lsilogic",
            ResourceType="6",
        ),
        _item(
            AddressOnParent="0",
            ElementName="Hard Disk 1",
            HostResource="ovf:/disk/vmdisk1",
            InstanceID="4",
            Parent="3",
            ResourceType="17",
        ),
        _item(
            AddressOnParent="7",
            AutomaticAllocation="true",
            Connection="VM Network",
            Description="E1000 ethernet adapter on the customer network",
            ElementName="Network adapter 1",
            InstanceID="5",
            ResourceSubType="E1000",
            ResourceType="10",
        ),
    ]
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{escape(vmdk_name)}" ovf:id="file1" ovf:size="{vmdk_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The initiators' network (iSCSI 3260, activation 80, ssh 22)</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="sgw-appliance">
    <Info>The sgw storage gateway appliance</Info>
    <Name>sgw-appliance</Name>
    <ProductSection>
      <Info>Product</Info>
      <Product>sgw storage gateway</Product>
      <Version>{escape(version)}</Version>
      <FullVersion>{escape(version)}</FullVersion>
    </ProductSection>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest">
      <Info>Debian GNU/Linux 12 (64-bit)</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>sgw-appliance</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
{chr(10).join(items)}
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_ova(vmdk: str, capacity: int, version: str, out: str) -> None:
    """The OVA is a tar: descriptor first, then the manifest, then the disk."""
    base = os.path.basename(out).removesuffix(".ova")
    vmdk_name = f"{base}-disk1.vmdk"
    ovf = descriptor(vmdk_name, os.path.getsize(vmdk), capacity, version).encode()
    ovf_name = f"{base}.ovf"
    mf = (
        f"SHA256({ovf_name})= {hashlib.sha256(ovf).hexdigest()}\n"
        f"SHA256({vmdk_name})= {_sha256(vmdk)}\n"
    ).encode()
    tmp = f"{out}.tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((ovf_name, ovf), (f"{base}.mf", mf)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        tar.add(vmdk, arcname=vmdk_name, filter=_plain)
    os.replace(tmp, out)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    return info


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    write_ova(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
