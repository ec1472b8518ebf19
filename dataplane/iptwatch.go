package dataplane

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// How often the legacy tables are looked at (they have no events).
const iptLegacyPoll = time.Second

// WatchIPTables keeps our jumps first in the node's built-in chains between
// resyncs: another agent inserting its own jump in front of ours (kube-proxy
// on every start puts KUBE-SERVICES at position 1 of nat PREROUTING, and
// would DNAT captured connections before they are captured) is undone
// within a second, not at the next resync.
//
// Cost while nothing changes: with the nft backend nothing runs at all (a
// netlink subscription to nf_tables events, woken only by rule changes in a
// built-in chain of mangle/nat/filter); the legacy tables have no events, so
// one getsockopt per table per second compares their size and hook offsets.
// A change costs one iptables-save (and a restore only if ours moved).
//
// repaired is called with every repair that wrote something. It returns
// when ctx is done, or at once with an error if it cannot watch.
func (d *Dataplane) WatchIPTables(ctx context.Context, repaired func(Result)) error {
	var changed <-chan struct{}
	var err error
	switch {
	case d.filter == BackendNFTables:
		changed, err = subscribe(ctx, d.node.InNS, unix.NETLINK_NETFILTER, []int{unix.NFNLGRP_NFTABLES}, touchesOurTable, d.log)
	case d.backend == iptables.NFT:
		changed, err = watchNFT(ctx, d.node.InNS, d.log)
	default:
		changed, err = pollLegacy(ctx, d.node.InNS, slices.Contains(d.fams, IPv6))
	}
	if err != nil {
		return fmt.Errorf("watch %s iptables: %w", d.backend, err)
	}
	for settle(ctx, changed) {
		res, err := d.repairNodeIPTables(ctx)
		if err != nil {
			d.log.Info("iptables repair failed; the resync will retry", zap.Error(err))
			continue
		}
		if res.TotalWrites() > 0 {
			d.log.Info("iptables repaired after a foreign change", zap.Strings("changes", res.Changes))
			if repaired != nil {
				repaired(res)
			}
		}
	}
	if ctx.Err() == nil {
		return fmt.Errorf("iptables change events stopped")
	}
	return nil
}

// repairNodeIPTables re-syncs the node's chains to what this process last
// wrote: the watch queues a resync of the node's filter managers alone,
// and converges them at once.
func (d *Dataplane) repairNodeIPTables(ctx context.Context) (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := newWriter(false)
	if d.filter == BackendNFTables {
		// Our table holds the sets too: a deleted table or element is
		// written back before the chains that match on them.
		for _, m := range d.mgr.setList() {
			m.queueResync()
			if err := convergeNow(ctx, m, w); err != nil {
				return *w.res, err
			}
		}
	}
	for _, f := range d.fams {
		m := d.mgr.nodeFilter[f]
		if m.params == nil {
			continue // nothing converged yet: the next Apply writes
		}
		p := *m.params
		m.queueResync()
		m.setDesired(d.nodeChains(p), &p)
		if err := m.applyUpdates(ctx, w); err != nil {
			return *w.res, err
		}
	}
	return *w.res, nil
}

// watchNFT signals every nf_tables change to a rule or chain of a built-in
// chain of the ip mangle, nat or filter table (where our jumps live), and
// every lost event (a full socket buffer).
func watchNFT(ctx context.Context, inNS iptables.InNS, log *zap.Logger) (<-chan struct{}, error) {
	return subscribe(ctx, inNS, unix.NETLINK_NETFILTER, []int{unix.NFNLGRP_NFTABLES}, touchesBuiltinChain, log)
}

// touchesBuiltinChain reports an nf_tables event that can move or remove
// one of our jumps: a rule added to or deleted from a built-in chain of an
// iptables table, or such a chain or table deleted.
func touchesBuiltinChain(m syscall.NetlinkMessage) bool {
	if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 || (m.Data[0] != unix.NFPROTO_IPV4 && m.Data[0] != unix.NFPROTO_IPV6) {
		return false
	}
	var tableAttr, chainAttr uint16
	switch m.Header.Type & 0xff {
	case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
		tableAttr, chainAttr = unix.NFTA_RULE_TABLE, unix.NFTA_RULE_CHAIN
	case unix.NFT_MSG_DELCHAIN:
		tableAttr, chainAttr = unix.NFTA_CHAIN_TABLE, unix.NFTA_CHAIN_NAME
	case unix.NFT_MSG_DELTABLE:
		tableAttr = unix.NFTA_TABLE_NAME
	default:
		return false
	}
	table, chain := nlAttr(m.Data[4:], tableAttr), ""
	if chainAttr != 0 {
		chain = nlAttr(m.Data[4:], chainAttr)
	}
	if !slices.Contains([]string{"mangle", "nat", "filter"}, table) {
		return false
	}
	return chainAttr == 0 || slices.Contains(iptables.Builtin[table], chain)
}

// touchesOurTable reports an nf_tables event that changes our own table's
// rules, chains or set elements, or deletes it.
func touchesOurTable(m syscall.NetlinkMessage) bool {
	if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 || m.Data[0] != unix.NFPROTO_INET {
		return false
	}
	var tableAttr uint16
	switch m.Header.Type & 0xff {
	case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
		tableAttr = unix.NFTA_RULE_TABLE
	case unix.NFT_MSG_DELCHAIN:
		tableAttr = unix.NFTA_CHAIN_TABLE
	case unix.NFT_MSG_DELTABLE:
		tableAttr = unix.NFTA_TABLE_NAME
	case unix.NFT_MSG_DELSETELEM:
		tableAttr = unix.NFTA_SET_ELEM_LIST_TABLE
	default:
		return false
	}
	return nlAttr(m.Data[4:], tableAttr) == NFTTable
}

// nlAttr is the string value of attribute typ in b ("" when absent).
func nlAttr(b []byte, typ uint16) string {
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		if l < 4 || l > len(b) {
			break
		}
		if binary.NativeEndian.Uint16(b[2:4])&0x3fff == typ {
			return string(trimNUL(b[4:l]))
		}
		b = b[min(len(b), (l+3)&^3):]
	}
	return ""
}

func trimNUL(b []byte) []byte {
	if i := slices.Index(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}

// ipt_getinfo from linux/netfilter_ipv4/ip_tables.h: the table's name in,
// its hook offsets, entry count and size out.
type iptGetinfo struct {
	Name       [32]byte
	ValidHooks uint32
	HookEntry  [5]uint32
	Underflow  [5]uint32
	NumEntries uint32
	Size       uint32
}

const iptSoGetInfo = 64 // IPT_SO_GET_INFO

// pollLegacy signals when a legacy table's layout changes (iptables, and
// ip6tables with v6): any rule inserted or deleted anywhere changes its size
// or the hook offsets.
func pollLegacy(ctx context.Context, inNS iptables.InNS, v6 bool) (<-chan struct{}, error) {
	type sock struct{ fd, level int }
	var socks []sock
	err := inNS(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		socks = append(socks, sock{fd, unix.IPPROTO_IP})
		if v6 {
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
			if err != nil {
				return err
			}
			socks = append(socks, sock{fd, unix.IPPROTO_IPV6}) // IP6T_SO_GET_INFO is 64 too
		}
		return nil
	})
	if err != nil {
		for _, s := range socks {
			_ = unix.Close(s.fd)
		}
		return nil, fmt.Errorf("raw socket for IPT_SO_GET_INFO: %w", err)
	}
	tables := []string{"mangle", "nat", "filter"}
	read := func() []iptGetinfo {
		var out []iptGetinfo
		for _, s := range socks {
			for _, t := range tables {
				var gi iptGetinfo
				copy(gi.Name[:], t)
				l := uint32(unsafe.Sizeof(gi))
				// A missing table reads as zeros; it changes when created.
				_, _, _ = unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s.fd), uintptr(s.level), iptSoGetInfo,
					uintptr(unsafe.Pointer(&gi)), uintptr(unsafe.Pointer(&l)), 0)
				out = append(out, gi)
			}
		}
		return out
	}
	out := make(chan struct{}, 1)
	go func() {
		defer close(out)
		defer func() {
			for _, s := range socks {
				_ = unix.Close(s.fd)
			}
		}()
		last := read()
		tick := time.NewTicker(iptLegacyPoll)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if cur := read(); !slices.Equal(cur, last) {
				last = cur
				select {
				case out <- struct{}{}:
				default:
				}
			}
		}
	}()
	return out, nil
}
