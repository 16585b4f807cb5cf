"""scp_node: a DICOM node that analyses series with MedGemma and returns DICOM SRs to the PACS.

The package folders follow the data path: ``dimse`` (the network layer: port, associations,
received data sets) -> ``handlers`` (DIMSE events) -> ``store`` (files + index) -> ``scheduler``
(completion, job queues) -> ``engine`` (MedGemma) -> ``report`` (DICOM SR) -> ``export`` (C-STORE
SCU, STOW-RS), with ``audit`` watching every step, ``web`` (DICOMweb) beside ``dimse``, and ``cli``
as the entry point.
"""

__version__ = "0.1.0"

#: Implementation Class UID of this software (pydicom's root + a hash of a fixed name), sent in
#: association requests/acceptances and written into the file meta of the SRs the node makes.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.63294701435066588577108256602299457672"
IMPLEMENTATION_VERSION_NAME = "SCPNODE_010"
