"""Test support: real peers (Orthanc, DCMTK) and the node as a subprocess."""
