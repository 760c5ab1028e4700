"""Replicas on etcd: the store, the leader election and the replica directory.

`serve --store etcd://...` runs a replica (`app.replica` wires it): every replica
serves xDS to its regions' proxies from the state in etcd; the one that holds the leader
key decides (docs/ha.md). Without `--store`, none of this runs: one process on SQLite.
"""
