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

    async def _collect_garbage(self, owner_uid: str) -> None:
        for (resource, _, _), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            meta = obj.get('metadata', {}) or {}
            if not any(ref.get('uid') == owner_uid for ref in meta.get('ownerReferences') or []):
                continue
            async with self._lock:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({'type': 'DELETED', 'object': raw})
            if meta.get('uid'):
                await self._collect_garbage(meta['uid'])
