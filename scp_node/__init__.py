"""scp_node: a DICOM node that analyses series with MedGemma and returns DICOM SRs to the PACS.

The package folders follow the data path: ``handlers`` (DIMSE events) -> ``store`` (files + index)
-> ``scheduler`` (completion, job queues) -> ``engine`` (MedGemma) -> ``report`` (DICOM SR)
-> ``export`` (C-STORE SCU), with ``audit`` watching every step and ``cli`` as the entry point.
"""

__version__ = "0.1.0"

#: Implementation Class UID root for objects this node writes (pydicom's UID root + a fixed suffix).
IMPLEMENTATION_VERSION_NAME = "SCPNODE_010"
