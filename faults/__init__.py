"""A fault campaign against a three-node cluster elected through etcd.

`python -m faults` (or `make faults`) starts three `litefs mount` daemons, each
in a network namespace of its own on a shared bridge, and an etcd on the
bridge. Writers commit through whichever node is primary and record every
commit it acknowledged; readers check invariants on the replicas; a scheduler
kills, freezes, restarts and cuts off nodes and restarts etcd at random. At the
end everything is healed and checked, and one summary line is printed.
"""
