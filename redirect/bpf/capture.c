// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// capture.c: nodemesh traffic capture.
//
// Hooks, maps and verdicts:
//
//   cgroup/connect4, cgroup/connect6 (attached once at the node's cgroup root)
//     A TCP connect from a socket whose network namespace cookie is in
//     `enrolled` is rewritten to the agent's outbound listener at
//     127.0.0.1:15001 ([::1]:15001) in that same namespace. The original
//     destination is parked in `pending` under the socket cookie. Sockets
//     carrying the agent's SO_MARK, loopback destinations, agent ports,
//     per-pod excluded ports (`excluded`) and non-stream sockets are left
//     alone (the agent's marks: `agent_mark`, and `deliver_mark` on the
//     transparent sockets that deliver inbound connections). The verdict is always 1 (allow): capture is a rewrite, and when
//     the agent is gone the rewritten connect finds no listener and fails,
//     which is what makes capture fail closed.
//
//   sockops (cgroup root, plus the agent's own cgroup)
//     ACTIVE_ESTABLISHED of a captured socket moves its original destination
//     from `pending` to `origdst`, keyed by (netns cookie, family, local
//     address, local port): the agent looks it up with the peer address of
//     the accepted connection. When same-node acceleration is on, both ends
//     of a captured connection (active app side, passive agent side on
//     :15001) are added to `sockhash`.
//
//   sk_msg (attached to `sockhash`)
//     Moves a message straight into the peer socket's receive queue. The
//     first message that finds no peer taints the sending socket (socket
//     local storage) so that a direction never mixes the redirected and
//     the TCP path, which could reorder bytes.
//
//   sk_lookup (attached per enrolled pod network namespace)
//     TCP arriving for an address in `inbound` (the pod's IPs) on any port
//     but 15008 and the pod's excluded inbound ports (`inbound_excluded`),
//     and not from the pod itself (its own address, or arriving over its
//     loopback device: the agent delivering with the peer's address as
//     source), is assigned to the agent's 15006
//     listener stored in `inbound_socks`. The listener gone (agent down)
//     means SK_DROP: inbound plaintext is refused, never delivered around
//     the agent. TCP for any other local address of the namespace that is
//     not loopback (an IPv6 link-local or SLAAC address, a secondary
//     address: nothing the agent was told about) is dropped too, so no
//     address of an enrolled pod reaches the application around the agent.
//     Counters of these two verdicts are in `lookup_stats`, apart from
//     `stats` so that maps pinned by older agents stay compatible.
//     One exception to failing closed: when the 15006 listener is absent
//     (its slot empty because the agent's socket closed, or sk_assign
//     fails), a connection whose source is one of the node's own addresses
//     (`node_addrs`, kept by the agent) to one of the pod's kubelet probe
//     ports (`node_probe_ports`) goes to the pod's own socket (SK_PASS):
//     kubelet's probes, which STRICT admits in plaintext from the node
//     anyway, keep working while the agent restarts. Counted as
//     `lookup_node_passed`. With the listener there, such connections go
//     to the agent as every other.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

#define PORT_OUTBOUND 15001
#define PORT_INBOUND 15006
#define PORT_HBONE 15008
#define PORT_ADMIN 15000
#define PORT_METRICS 15020
#define PORT_READY 15021

// Set by the loader: the SO_MARK carried by every agent socket.
const volatile __u32 agent_mark = 0;
// Set by the loader: the SO_MARK of the agent's sockets that deliver an
// inbound connection to the application with the peer's address as source
// (a transparent socket; the pod's policy route for this mark brings the
// application's replies back to it). Never captured either.
const volatile __u32 deliver_mark = 0;
// Set by the loader to 1 when the kernel has bpf_sk_lookup.ingress_ifindex
// (Linux 5.17+). On older kernels the branch that reads it is dead code the
// verifier never checks, and transparent delivery stays off.
const volatile __u32 lookup_ifindex = 0;

#define LOOPBACK_IFINDEX 1

struct pod_cfg {
	__u32 flags;
	__u32 _pad;
};

struct port_key {
	__u64 netns;
	__u32 port; // host byte order
	__u32 _pad;
};

struct orig_dst {
	__u32 family;
	__u32 port; // host byte order
	__u32 addr[4]; // network byte order; IPv4 in addr[0]
};

struct flow_key {
	__u64 netns;
	__u32 family;
	__u32 port; // host byte order
	__u32 addr[4];
};

struct ip_key {
	__u32 family;
	__u32 addr[4];
};

struct inbound_val {
	__u32 slot; // index in inbound_socks of the 15006 listener
	__u32 _pad;
	__u64 netns; // the pod's netns cookie, for re-adoption
};

struct sock_key {
	__u64 netns;
	__u32 family;
	__u32 local_port; // host byte order
	__u32 remote_port; // host byte order
	__u32 local_addr[4];
	__u32 remote_addr[4];
	__u32 _pad;
};

struct config {
	__u32 accel; // 1: add captured local connections to sockhash
	__u32 _pad;
};

enum {
	STAT_CONNECT_CAPTURED,
	STAT_CONNECT_EXCLUDED,
	STAT_ORIGDST_RECORDED,
	STAT_SOCKHASH_ADDED,
	STAT_MSG_REDIRECTED,
	STAT_MSG_PASSED,
	STAT_LOOKUP_ASSIGNED,
	STAT_LOOKUP_DROPPED,
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct pod_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} excluded SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} origdst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct ip_key);
	__type(value, struct inbound_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sockhash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, struct port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} accel_probe SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

// Inbound ports a pod excluded from capture (annotation
// nodemesh.io/exclude-inbound-ports), keyed by its netns cookie: they reach
// the application directly, in plaintext.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_excluded SEC(".maps");

enum {
	LSTAT_UNKNOWN_DROPPED, // a local address not in `inbound`
	LSTAT_EXCLUDED,        // an excluded inbound port, passed to the application
	LSTAT_NODE_PASSED,     // no listener; from the node to a probe port, passed to the application
	LSTAT_MAX = 8,         // room for more without changing the pinned map
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LSTAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lookup_stats SEC(".maps");

// The node's own addresses (the agent writes the addresses of its node's
// interfaces but loopback and link-local ones): the sources of kubelet's
// probes. Pinned, so they outlive the agent.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct ip_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_addrs SEC(".maps");

// The TCP ports kubelet probes per pod, keyed by its netns cookie: the
// ports that connections from the node reach directly while the pod's
// 15006 listener is absent.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_probe_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} taint SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline void lcount(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&lookup_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline int agent_port(__u16 port)
{
	switch (port) {
	case PORT_OUTBOUND:
	case PORT_INBOUND:
	case PORT_HBONE:
	case PORT_ADMIN:
	case PORT_METRICS:
	case PORT_READY:
		return 1;
	}
	return 0;
}

// port_host converts a sock_ops/sk_msg remote_port to host order. Kernels
// expose it as the 16-bit network-order port, either in the low or (since
// 5.x on little endian) in the high half of the 32-bit field.
static __always_inline __u16 port_host(__u32 p)
{
	if (p > 0xffff)
		return bpf_ntohl(p);
	return bpf_ntohs((__u16)p);
}

// skip_connect reports whether the connect of this socket must not be
// captured: not stream, agent socket, or namespace not enrolled. It returns
// the namespace cookie through ns.
static __always_inline int skip_connect(struct bpf_sock_addr *ctx, __u64 *ns)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	if (agent_mark != 0 && sk->mark == agent_mark)
		return 1;
	if (deliver_mark != 0 && sk->mark == deliver_mark)
		return 1;
	*ns = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&enrolled, ns))
		return 1;
	return 0;
}

static __always_inline int skip_port(__u64 ns, __u16 port)
{
	if (agent_port(port))
		return 1;
	struct port_key pk = { .netns = ns, .port = port };
	if (bpf_map_lookup_elem(&excluded, &pk))
		return 1;
	return 0;
}

SEC("cgroup/connect4")
int nm_connect4(struct bpf_sock_addr *ctx)
{
	__u64 ns = 0;
	if (skip_connect(ctx, &ns))
		return 1;

	__u32 ip = ctx->user_ip4;
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 hip = bpf_ntohl(ip);
	// Loopback and 0.0.0.0 (which Linux treats as local) stay local.
	if ((hip >> 24) == 127 || hip == 0) {
		count(STAT_CONNECT_EXCLUDED);
		return 1;
	}
	if (skip_port(ns, port)) {
		count(STAT_CONNECT_EXCLUDED);
		return 1;
	}

	struct orig_dst o = { .family = AF_INET, .port = port };
	o.addr[0] = ip;
	__u64 sc = bpf_get_socket_cookie(ctx);
	// A failed update still redirects: the agent then finds no original
	// destination and refuses the connection (fail closed).
	bpf_map_update_elem(&pending, &sc, &o, BPF_ANY);

	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(PORT_OUTBOUND);
	count(STAT_CONNECT_CAPTURED);
	return 1;
}

SEC("cgroup/connect6")
int nm_connect6(struct bpf_sock_addr *ctx)
{
	__u64 ns = 0;
	if (skip_connect(ctx, &ns))
		return 1;

	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	int mapped = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);

	if (a0 == 0 && a1 == 0 && a2 == 0 && (a3 == 0 || a3 == bpf_htonl(1))) {
		// :: and ::1
		count(STAT_CONNECT_EXCLUDED);
		return 1;
	}
	if (mapped && ((bpf_ntohl(a3) >> 24) == 127 || a3 == 0)) {
		count(STAT_CONNECT_EXCLUDED);
		return 1;
	}
	if (skip_port(ns, port)) {
		count(STAT_CONNECT_EXCLUDED);
		return 1;
	}

	struct orig_dst o = { .family = AF_INET6, .port = port };
	o.addr[0] = a0;
	o.addr[1] = a1;
	o.addr[2] = a2;
	o.addr[3] = a3;
	__u64 sc = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&pending, &sc, &o, BPF_ANY);

	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (mapped) {
		// A dual-stack socket connecting to an IPv4 address: stay IPv4.
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(PORT_OUTBOUND);
	count(STAT_CONNECT_CAPTURED);
	return 1;
}

static __always_inline int v4mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

// A dual-stack IPv6 socket talking IPv4 (::ffff:a.b.c.d) is keyed as IPv4,
// which is how the agent's IPv4 listener sees the same connection.
static __always_inline void flow_key_norm(struct flow_key *k)
{
	if (k->family == AF_INET6 && v4mapped(k->addr)) {
		k->family = AF_INET;
		k->addr[0] = k->addr[3];
		k->addr[2] = 0;
		k->addr[3] = 0;
	}
}

static __always_inline void sock_key_norm(struct sock_key *k)
{
	if (k->family == AF_INET6 && v4mapped(k->local_addr) && v4mapped(k->remote_addr)) {
		k->family = AF_INET;
		k->local_addr[0] = k->local_addr[3];
		k->local_addr[2] = 0;
		k->local_addr[3] = 0;
		k->remote_addr[0] = k->remote_addr[3];
		k->remote_addr[2] = 0;
		k->remote_addr[3] = 0;
	}
}

static __always_inline void sock_key_from_ops(struct sock_key *k, struct bpf_sock_ops *skops, __u64 ns)
{
	k->netns = ns;
	k->family = skops->family;
	k->local_port = skops->local_port;
	k->remote_port = port_host(skops->remote_port);
	if (skops->family == AF_INET) {
		k->local_addr[0] = skops->local_ip4;
		k->remote_addr[0] = skops->remote_ip4;
	} else {
		k->local_addr[0] = skops->local_ip6[0];
		k->local_addr[1] = skops->local_ip6[1];
		k->local_addr[2] = skops->local_ip6[2];
		k->local_addr[3] = skops->local_ip6[3];
		k->remote_addr[0] = skops->remote_ip6[0];
		k->remote_addr[1] = skops->remote_ip6[1];
		k->remote_addr[2] = skops->remote_ip6[2];
		k->remote_addr[3] = skops->remote_ip6[3];
		sock_key_norm(k);
	}
}

static __always_inline int accel_on(void)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&settings, &zero);
	return c && c->accel;
}

static __always_inline void accel_add(struct bpf_sock_ops *skops, __u64 ns)
{
	struct sock_key k = {};
	sock_key_from_ops(&k, skops, ns);
	if (bpf_sock_hash_update(skops, &sockhash, &k, BPF_NOEXIST) == 0)
		count(STAT_SOCKHASH_ADDED);
}

static __always_inline int probe_port(__u64 ns, __u16 port)
{
	struct port_key pk = { .netns = ns, .port = port };
	return bpf_map_lookup_elem(&accel_probe, &pk) != 0;
}

SEC("sockops")
int nm_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		__u64 ns = bpf_get_netns_cookie(skops);
		__u64 sc = bpf_get_socket_cookie(skops);
		struct orig_dst *o = bpf_map_lookup_elem(&pending, &sc);
		if (o) {
			struct flow_key fk = {
				.netns = ns,
				.family = skops->family,
				.port = skops->local_port,
			};
			if (skops->family == AF_INET) {
				fk.addr[0] = skops->local_ip4;
			} else {
				fk.addr[0] = skops->local_ip6[0];
				fk.addr[1] = skops->local_ip6[1];
				fk.addr[2] = skops->local_ip6[2];
				fk.addr[3] = skops->local_ip6[3];
				flow_key_norm(&fk);
			}
			struct orig_dst copy = *o;
			if (bpf_map_update_elem(&origdst, &fk, &copy, BPF_ANY) == 0)
				count(STAT_ORIGDST_RECORDED);
			bpf_map_delete_elem(&pending, &sc);
			if (accel_on())
				accel_add(skops, ns);
			return 1;
		}
		if (probe_port(ns, port_host(skops->remote_port)))
			accel_add(skops, ns);
		return 1;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		__u64 ns = bpf_get_netns_cookie(skops);
		if (skops->local_port == PORT_OUTBOUND) {
			if (accel_on() && bpf_map_lookup_elem(&enrolled, &ns))
				accel_add(skops, ns);
			return 1;
		}
		if (probe_port(ns, skops->local_port))
			accel_add(skops, ns);
		return 1;
	}
	}
	return 1;
}

SEC("sk_msg")
int nm_skmsg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	__u8 *tainted = bpf_sk_storage_get(&taint, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!tainted || *tainted) {
		count(STAT_MSG_PASSED);
		return SK_PASS;
	}

	struct sock_key peer = {
		.netns = bpf_get_netns_cookie(msg),
		.family = msg->family,
		.local_port = port_host(msg->remote_port),
		.remote_port = msg->local_port,
	};
	if (msg->family == AF_INET) {
		peer.local_addr[0] = msg->remote_ip4;
		peer.remote_addr[0] = msg->local_ip4;
	} else {
		peer.local_addr[0] = msg->remote_ip6[0];
		peer.local_addr[1] = msg->remote_ip6[1];
		peer.local_addr[2] = msg->remote_ip6[2];
		peer.local_addr[3] = msg->remote_ip6[3];
		peer.remote_addr[0] = msg->local_ip6[0];
		peer.remote_addr[1] = msg->local_ip6[1];
		peer.remote_addr[2] = msg->local_ip6[2];
		peer.remote_addr[3] = msg->local_ip6[3];
		sock_key_norm(&peer);
	}
	if (bpf_msg_redirect_hash(msg, &sockhash, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(STAT_MSG_REDIRECTED);
		return SK_PASS;
	}
	// No peer (yet): this direction uses TCP from now on.
	*tainted = 1;
	count(STAT_MSG_PASSED);
	return SK_PASS;
}

// no_listener decides a connection to an enrolled pod whose 15006 listener
// is absent: SK_DROP (fail closed), except from one of the node's own
// addresses to one of the pod's probe ports, which goes to the pod's own
// socket (SK_PASS, the kernel's normal lookup).
static __always_inline int no_listener(struct bpf_sk_lookup *ctx, __u64 netns)
{
	struct ip_key src = { .family = ctx->family };
	if (ctx->family == AF_INET) {
		src.addr[0] = ctx->remote_ip4;
	} else {
		src.addr[0] = ctx->remote_ip6[0];
		src.addr[1] = ctx->remote_ip6[1];
		src.addr[2] = ctx->remote_ip6[2];
		src.addr[3] = ctx->remote_ip6[3];
	}
	struct port_key pk = { .netns = netns, .port = ctx->local_port };
	if (bpf_map_lookup_elem(&node_addrs, &src) && bpf_map_lookup_elem(&node_probe_ports, &pk)) {
		lcount(LSTAT_NODE_PASSED);
		return SK_PASS;
	}
	count(STAT_LOOKUP_DROPPED);
	return SK_DROP;
}

SEC("sk_lookup")
int nm_sklookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->local_port == PORT_HBONE)
		return SK_PASS;

	struct ip_key k = { .family = ctx->family };
	__u32 same, loopback;
	if (ctx->family == AF_INET) {
		k.addr[0] = ctx->local_ip4;
		same = ctx->remote_ip4 == ctx->local_ip4;
		loopback = (bpf_ntohl(ctx->local_ip4) >> 24) == 127;
	} else if (ctx->family == AF_INET6) {
		k.addr[0] = ctx->local_ip6[0];
		k.addr[1] = ctx->local_ip6[1];
		k.addr[2] = ctx->local_ip6[2];
		k.addr[3] = ctx->local_ip6[3];
		same = ctx->remote_ip6[0] == ctx->local_ip6[0] &&
		       ctx->remote_ip6[1] == ctx->local_ip6[1] &&
		       ctx->remote_ip6[2] == ctx->local_ip6[2] &&
		       ctx->remote_ip6[3] == ctx->local_ip6[3];
		loopback = ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 &&
			   ((ctx->local_ip6[2] == 0 && ctx->local_ip6[3] == bpf_htonl(1)) ||
			    (ctx->local_ip6[2] == bpf_htonl(0xffff) &&
			     (bpf_ntohl(ctx->local_ip6[3]) >> 24) == 127));
	} else {
		return SK_PASS;
	}
	// Loopback is reachable only from inside the namespace (the app, and
	// the agent's own listeners and probes there).
	if (loopback)
		return SK_PASS;
	// Arrived over the namespace's own loopback device: generated inside
	// the pod, by the application or by the agent delivering an inbound
	// connection from the peer's address. Nothing from outside the
	// namespace arrives there.
	if (lookup_ifindex && ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	struct inbound_val *v = bpf_map_lookup_elem(&inbound, &k);
	if (same)
		return SK_PASS; // the pod talking to itself, or the agent delivering inbound
	if (!v) {
		lcount(LSTAT_UNKNOWN_DROPPED);
		return SK_DROP;
	}
	struct port_key pk = { .netns = v->netns, .port = ctx->local_port };
	if (bpf_map_lookup_elem(&inbound_excluded, &pk)) {
		lcount(LSTAT_EXCLUDED);
		return SK_PASS;
	}

	__u32 idx = v->slot;
	__u64 netns = v->netns;
	struct bpf_sock *sk = bpf_map_lookup_elem(&inbound_socks, &idx);
	if (!sk)
		return no_listener(ctx, netns);
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return no_listener(ctx, netns);
	count(STAT_LOOKUP_ASSIGNED);
	return SK_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
