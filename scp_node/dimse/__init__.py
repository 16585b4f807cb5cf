"""The DIMSE network layer: the node's port, its associations, the data sets they bring.

=========================  ==================================================================
``listener``               the AE (the one place for network settings), its handlers, the
                           shared listening socket's server; ``[node] fast_path`` picks the
                           fast path or pynetdicom's own
``receivers``              the pre-fork receiver processes serving that socket, supervised
``pynetdicom_internals``   the fast path, and the **only** module that touches pynetdicom's
                           private names (its docstring lists each, and why; pynetdicom is
                           pinned exactly and ``tests/dimse/test_compat.py`` checks them)
``negotiation``            an A-ASSOCIATE-RQ seen before: negotiation and A-ASSOCIATE-AC from memory
``buffer``                 a data set in memory, or in a spool file past 16 MiB
``commands``               the plain C-STORE-RQ read and C-STORE-RSP written without pydicom
``transport``              the listening socket, kernel timeouts, PDU framing
``tls``                    DICOM TLS contexts (PS3.15 B.1), the handshake off the accept loop
``status_codes``           every status the node answers, with its Error Comment
=========================  ==================================================================

The event handlers themselves (allow-list, C-ECHO, C-STORE) are in :mod:`scp_node.handlers`.
This package imports nothing here so that importing one of its modules loads only what it needs.
"""
