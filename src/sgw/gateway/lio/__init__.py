"""iSCSI export of the gateway's volumes through LIO (the appliance's kernel target).

Each volume's NBD export is attached to ``/dev/nbdN`` (the kernel's NBD netlink
interface, over a socket pair whose other end the daemon serves) and exported by LIO with
rtslib-fb: one target per volume, an iblock backstore, CHAP and mutual CHAP, initiator
ACLs and tuned attributes. The desired state is a pure function (``desired``), applied by
an adapter that diffs it against LIO's live objects (``kernel``); ``exporter`` ties them to
the daemon's start, changes and stop. Enabled by
``[lio] enabled = true`` (``settings``).
"""
