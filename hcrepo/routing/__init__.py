"""Which server answers: the router, its nodes and what is known about them.

Holds the router (reads to replicas, writes to the primary, failover), one node per server
(its pool and breaker), the health facts of a node and the monitor thread that refreshes them,
and read-your-writes positions (consistency). May import the shared modules (config, errors,
tenancy), the wire (pipeline) and hcrepo.ops; nothing above it.
"""
