package kerneltest

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/ambient-redirect/ambient-redirect/dataplane/iptables"
)

// Op is what a write did to its object.
type Op string

// The ops of a journal entry.
const (
	OpAdd     Op = "add"
	OpReplace Op = "replace"
	OpDelete  Op = "delete"
)

// Entry is one successful write to a fake kernel.
type Entry struct {
	// Seq numbers the entries of a journal from 1, in write order.
	Seq int
	// NS names the fake network namespace written ("node", a ztunnel's).
	NS string
	// Kind is link, addr, neigh, route, rule, ipset, sysctl or iptables
	// (ip6tables for IPv6).
	Kind string
	Op   Op
	// Object is the object written, as the fake renders it.
	Object string
	// Rules are, for an iptables restore, every table's rules after it
	// (iptables-save format).
	Rules string
}

func (e Entry) String() string {
	return fmt.Sprintf("#%d %s %s %s %s", e.Seq, e.NS, e.Kind, e.Op, e.Object)
}

// Journal is one ordered record of the writes to any number of fakes (the
// node's and every ztunnel's netlink, sysctls and iptables), in the order
// they were issued. Observers run after each write, outside the fakes'
// locks, so they may read any fake's state: what a packet would meet at
// that moment.
type Journal struct {
	recMu     sync.Mutex // held across a record and its observers
	mu        sync.Mutex
	entries   []Entry
	observers []func(Entry)
}

// NewJournal returns an empty journal.
func NewJournal() *Journal { return &Journal{} }

// Observe calls f after every later write.
func (j *Journal) Observe(f func(Entry)) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.observers = append(j.observers, f)
}

// Entries returns a copy of the entries so far.
func (j *Journal) Entries() []Entry {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]Entry(nil), j.entries...)
}

// Len is the number of entries so far.
func (j *Journal) Len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.entries)
}

// record appends e and runs the observers. It must be called with no
// fake's lock held.
func (j *Journal) record(e Entry) {
	if j == nil {
		return
	}
	// The dataplane may write two families at once: observers see one
	// write at a time, in the journal's order.
	j.recMu.Lock()
	defer j.recMu.Unlock()
	j.mu.Lock()
	e.Seq = len(j.entries) + 1
	j.entries = append(j.entries, e)
	obs := append([]func(Entry){}, j.observers...)
	j.mu.Unlock()
	for _, f := range obs {
		f(e)
	}
}

// journalRunner is an iptables runner that journals every successful
// restore with the rules it left.
type journalRunner struct {
	*iptables.Fake
	j    func() *Journal
	ns   func() string
	kind string
}

// Restore implements iptables.Runner.
func (r journalRunner) Restore(ctx context.Context, input string) error {
	if err := r.Fake.Restore(ctx, input); err != nil {
		return err
	}
	if j := r.j(); j != nil {
		rules, _ := r.Save(ctx, "")
		var tables []string
		for _, l := range strings.Split(input, "\n") {
			if strings.HasPrefix(l, "*") {
				tables = append(tables, l[1:])
			}
		}
		j.record(Entry{NS: r.ns(), Kind: r.kind, Op: OpReplace, Object: "restore " + strings.Join(tables, ","), Rules: rules})
	}
	return nil
}
