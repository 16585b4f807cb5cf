"""Operations: Prometheus ``/metrics`` and ``/healthz`` on the ``[ops]`` port.

:mod:`.stats` holds the hooks the data path calls (cheap, and off without ``[ops]``);
:mod:`.metrics`, :mod:`.health` and :mod:`.server` are loaded only by a node that has ``[ops]``.
"""
