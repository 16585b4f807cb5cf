"""UIDs for the SR: random ones for new objects, deterministic ones for the model as a device.

Why deterministic for the model: the Device UID in Contributing Equipment and the Device
Observer UID in the observation context must identify *the model build*. Deriving it from
the weights hash means the same weights always give the same UID (so a PACS can group results
by algorithm), and any change of weights gives a new one, without a registry to keep.
"""

from __future__ import annotations

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

import scp_node
from scp_node.engine.result import ModelIdentity


def new_uid() -> UID:
    """A fresh random UID under pydicom's root (SOP Instance / Series Instance / tracking)."""
    return generate_uid(prefix=PYDICOM_ROOT_UID)


def model_device_uid(model: ModelIdentity) -> UID:
    """Device UID of the model, a pure function of its weights hash.

    The hash is normalised (stripped, lower case) so that the same digest written in a
    different case cannot fork the identity.
    """
    digest = model.weights_sha256.strip().lower()
    if not digest:
        raise ValueError("ModelIdentity.weights_sha256 is empty; cannot derive a Device UID")
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["scp_node model device", digest])


def implementation_class_uid() -> UID:
    """Implementation Class UID written in the file meta of our SRs.

    Uses ``scp_node.IMPLEMENTATION_CLASS_UID`` if the package defines it, else a fixed UID
    derived from pydicom's root, so every file from this node carries the same value.
    """
    configured = getattr(scp_node, "IMPLEMENTATION_CLASS_UID", None)
    if configured:
        return UID(str(configured))
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["scp_node implementation class"])
