"""The emulator with kmock's own object lookups (a scan of every stored object per LIST, GET or write) and
its garbage collector as it was before `object_index` (a scan per deletion): the oracle of the index's
property test and the baseline of bench/emulator_list.py."""

from __future__ import annotations

import kmock

from kubetune_testing.emulator import K8sEmulator


class ScanningEmulator(K8sEmulator):
    """K8sEmulator answering LIST, GET and writes by kmock's scans. Its writes still keep the index
    current (the watch replay reads it), so its writes cost slightly more than kmock's alone did."""

    _KubernetesEmulator__get_objs = kmock.KubernetesEmulator._KubernetesEmulator__get_objs
    _get_resources = kmock.KubernetesEmulator._get_resources

    def _dependents(self, owner_uid: str) -> list:
        return list(self.objects)  # every stored object, as the scanning collector read them
