// Package iptables keeps a set of owned chains (and the jumps to them at
// position 1 of the built-in chains) equal to a desired rule set.
//
// Hazards it handles:
//   - Half-written rule sets: every change to a table is one
//     `iptables-restore --noflush -w` transaction that re-declares (and so
//     flushes and refills) only our chains; other chains are never touched.
//   - Jumps drifting from position 1 (another agent inserted in front of us)
//     or duplicated: all our jumps are deleted and one is inserted at 1, in the
//     same transaction.
//   - Zero writes when nothing changed: desired rules are written in the form
//     iptables-save prints them, and what the kernel printed back after a write
//     is learned, so a format difference costs one write, not one per sync.
//   - Leftover chains with our prefix (an older version, a dropped feature)
//     are removed.
package iptables

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// JumpComment marks the jump rules we put in built-in chains.
const JumpComment = "ambient-redirect"

// Tables we manage, in the order they are synced.
var Tables = []string{"mangle", "nat", "filter"}

// Builtin lists the built-in chains of each table.
var Builtin = map[string][]string{
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	"mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	"raw":    {"PREROUTING", "OUTPUT"},
}

// Runner runs iptables-save / iptables-restore for one backend in one netns.
type Runner interface {
	// Backend is "nft" or "legacy".
	Backend() string
	// Save returns `iptables-save -t table`, or with table "" all existing
	// tables (which, unlike -t, does not instantiate a missing legacy table).
	Save(ctx context.Context, table string) (string, error)
	// Restore feeds input to `iptables-restore --noflush -w`.
	Restore(ctx context.Context, input string) error
}

// Chain is one owned chain, jumped to from position 1 of Parent (when set).
type Chain struct {
	Table  string
	Name   string
	Parent string
	// Rules are rule specs in iptables-save form, without "-A <chain> ".
	Rules []string
}

// Ruleset is the desired content of all our chains.
type Ruleset []Chain

// Render prints a rule set as iptables-save-like text, for golden tests.
func (rs Ruleset) Render() string {
	var b strings.Builder
	for _, t := range Tables {
		var chains []Chain
		for _, c := range rs {
			if c.Table == t {
				chains = append(chains, c)
			}
		}
		if len(chains) == 0 {
			continue
		}
		fmt.Fprintf(&b, "*%s\n", t)
		for _, c := range chains {
			if c.Parent != "" {
				fmt.Fprintf(&b, "-A %s %s\n", c.Parent, jumpSpec(c.Name))
			}
		}
		for _, c := range chains {
			for _, r := range c.Rules {
				fmt.Fprintf(&b, "-A %s %s\n", c.Name, r)
			}
		}
	}
	return b.String()
}

func jumpSpec(chain string) string {
	return "-m comment --comment " + JumpComment + " -j " + chain
}

// Syncer converges the chains with a given prefix to a Ruleset.
type Syncer struct {
	run    Runner
	prefix string

	mu sync.Mutex
	// learned maps a desired rule line to the form the kernel printed back.
	learned map[string]string
	// last are the tables as last read back, nil when unknown (see Update).
	last map[string]Parsed
	// saved is the newest `iptables-save` text of every table, whoever
	// read it (see Saved); writes since do not clear it.
	saved string
}

// NewSyncer returns a syncer owning every chain whose name starts with prefix.
func NewSyncer(r Runner, prefix string) *Syncer {
	return &Syncer{run: r, prefix: prefix, learned: map[string]string{}}
}

// Saved returns the newest full `iptables-save` text this syncer read (or
// was given with NoteSaved), "" when none: the conflict check reads the
// other agents' rules from it instead of running iptables-save again.
func (s *Syncer) Saved() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.saved
}

// NoteSaved records a full `iptables-save` text read elsewhere (see Saved).
func (s *Syncer) NoteSaved(text string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.saved = text
}

// Runner returns the runner in use.
func (s *Syncer) Runner() Runner { return s.run }

// Change describes one planned or made change, for logs and the debug endpoint.
type Change struct {
	Table  string `json:"table"`
	Chain  string `json:"chain"`
	Reason string `json:"reason"`
}

// Result of a sync.
type Result struct {
	// Restores is the number of iptables-restore transactions run (one per changed table).
	Restores int
	Changes  []Change
}

// Sync makes the kernel match desired, reading the tables back first. With
// dryRun it only reports the changes.
func (s *Syncer) Sync(ctx context.Context, desired Ruleset, dryRun bool) (Result, error) {
	s.mu.Lock()
	res, learn, err := s.sync(ctx, desired, dryRun, nil)
	s.unlockAfter(learn)
	return res, err
}

// unlockAfter releases the syncer once learn (nil: nothing to learn) has
// read back what was just written. That read runs in the background: the
// caller goes on with its other writes while it runs, and the syncer's next
// use waits for it.
func (s *Syncer) unlockAfter(learn func()) {
	if learn == nil {
		s.mu.Unlock()
		return
	}
	go func() {
		defer s.mu.Unlock()
		learn()
	}()
}

// Update is Sync starting from the tables as this syncer last read them back
// (Sync, Actual, or after its own writes) since Forget, instead of reading
// them again: for the writes that follow one another within a convergence.
// Without such a read it reads; a plan that would delete jumps by position
// (they may have moved since) is made again from a fresh read.
func (s *Syncer) Update(ctx context.Context, desired Ruleset) (Result, error) {
	s.mu.Lock()
	if s.last != nil {
		res, learn, err := s.sync(ctx, desired, false, s.last)
		if err == nil || !errors.Is(err, errStale) {
			s.unlockAfter(learn)
			return res, err
		}
		s.last = nil
	}
	res, learn, err := s.sync(ctx, desired, false, nil)
	s.unlockAfter(learn)
	return res, err
}

// Wait returns once the read-back a write left running in the background
// (unlockAfter) is done.
func (s *Syncer) Wait() {
	s.mu.Lock()
	defer s.mu.Unlock()
}

// Forget drops what the syncer last read back: the next Update reads.
func (s *Syncer) Forget() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last = nil
}

// errStale marks a plan made from tables read earlier that cannot be
// trusted to apply (see Update).
var errStale = errors.New("tables read earlier may be stale")

// sync plans from from (nil: read back now) and writes every table that
// differs in one iptables-restore. learn, when not nil, is to run next,
// before anything else uses the syncer (see unlockAfter).
func (s *Syncer) sync(ctx context.Context, desired Ruleset, dryRun bool, from map[string]Parsed) (_ Result, learn func(), _ error) {
	var res Result
	all := from
	if all == nil {
		saved, err := s.run.Save(ctx, "")
		if err != nil {
			return res, nil, err
		}
		s.saved = saved
		all = ParseSaveAll(saved)
		if !dryRun { // a dry run (Diff) may run beside a convergence: leave its reads alone
			s.last = all
		}
	}
	var input, drops strings.Builder
	var written []string
	for _, table := range Tables {
		want := desiredFor(desired, table)
		cur, exists := all[table]
		if !exists && len(want) == 0 {
			continue // nothing of ours can be in a table that does not exist
		}
		in, drop, changes, byPosition := s.plan(table, want, cur)
		if len(changes) == 0 {
			continue
		}
		if from != nil && byPosition {
			return Result{}, nil, errStale
		}
		res.Changes = append(res.Changes, changes...)
		input.WriteString(in)
		drops.WriteString(drop)
		written = append(written, table)
	}
	if dryRun || input.Len() == 0 {
		return res, nil, nil
	}
	// One process for every table that changed: each table is still its
	// own transaction (COMMIT), in the order of Tables.
	s.last = nil // unknown until read back
	if err := s.run.Restore(ctx, input.String()); err != nil {
		res.Changes = nil
		return res, nil, fmt.Errorf("iptables-restore (%s, tables %s): %w", s.run.Backend(), strings.Join(written, ","), err)
	}
	res.Restores++
	if drops.Len() > 0 {
		// Deleting a stale chain fails while something we do not manage
		// still jumps to it: keep that out of the transaction that updates
		// our live chains. It is emptied already.
		if err := s.run.Restore(ctx, drops.String()); err != nil {
			res.Changes = append(res.Changes, Change{strings.Join(written, ","), "", "stale chains not deleted (still referenced?): " + err.Error()})
		} else {
			res.Restores++
		}
	}
	if s.knows(desired, written) {
		return res, nil, nil
	}
	return res, func() { s.learn(ctx, desired, written) }, nil
}

// ParseSaveAll parses the output of iptables-save for all tables.
func ParseSaveAll(text string) map[string]Parsed {
	out := map[string]Parsed{}
	var table string
	var b strings.Builder
	for _, line := range strings.Split(text, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			table = strings.TrimSpace(line[1:])
			b.Reset()
		case strings.TrimSpace(line) == "COMMIT" && table != "":
			out[table] = ParseSave(b.String())
			table = ""
		case table != "":
			b.WriteString(line + "\n")
		}
	}
	return out
}

// Actual returns our chains as the kernel has them, table -> chain -> rules.
func (s *Syncer) Actual(ctx context.Context) (map[string]map[string][]string, error) {
	out := map[string]map[string][]string{}
	saved, err := s.run.Save(ctx, "")
	if err != nil {
		return nil, err
	}
	all := ParseSaveAll(saved)
	s.mu.Lock()
	s.last, s.saved = all, saved
	s.mu.Unlock()
	for table, cur := range all {
		for chain, rules := range cur.Rules {
			if !s.ours(chain) && !isJumpHolder(table, chain, rules, s.prefix) {
				continue
			}
			if out[table] == nil {
				out[table] = map[string][]string{}
			}
			if s.ours(chain) {
				out[table][chain] = rules
			} else {
				for _, r := range rules {
					if s.jumpTarget(r) != "" {
						out[table][chain] = append(out[table][chain], r)
					}
				}
			}
		}
	}
	return out, nil
}

func isJumpHolder(table, chain string, rules []string, prefix string) bool {
	if !slices.Contains(Builtin[table], chain) {
		return false
	}
	for _, r := range rules {
		if strings.Contains(r, " -j "+prefix) || strings.HasPrefix(r, "-j "+prefix) {
			return true
		}
	}
	return false
}

func desiredFor(rs Ruleset, table string) []Chain {
	var out []Chain
	for _, c := range rs {
		if c.Table == table {
			out = append(out, c)
		}
	}
	return out
}

func (s *Syncer) ours(chain string) bool { return strings.HasPrefix(chain, s.prefix) }

// jumpTarget returns the chain of ours a rule jumps to, or "".
func (s *Syncer) jumpTarget(rule string) string {
	f := strings.Fields(rule)
	for i := 0; i+1 < len(f); i++ {
		if (f[i] == "-j" || f[i] == "-g") && s.ours(f[i+1]) {
			return f[i+1]
		}
	}
	return ""
}

func (s *Syncer) canon(line string) string {
	if l, ok := s.learned[line]; ok {
		return l
	}
	return line
}

// plan builds the restore input for one table and the list of changes.
// byPosition reports jumps deleted by position.
func (s *Syncer) plan(table string, want []Chain, cur Parsed) (input, drop string, changes []Change, byPosition bool) {
	var decl, body, jumpDel, jumpAdd, stale []string

	wantNames := map[string]bool{}
	for _, c := range want {
		wantNames[c.Name] = true
		rules, exists := cur.Rules[c.Name]
		if !exists && !cur.Chains[c.Name] {
			changes = append(changes, Change{table, c.Name, "chain missing"})
		} else if !s.equal(c.Rules, rules) {
			changes = append(changes, Change{table, c.Name, fmt.Sprintf("rules differ (want %d, have %d)", len(c.Rules), len(rules))})
		} else {
			continue
		}
		// Declaring a chain in --noflush mode creates or flushes it.
		decl = append(decl, ":"+c.Name+" - [0:0]")
		for _, r := range c.Rules {
			body = append(body, "-A "+c.Name+" "+r)
		}
	}

	// Jumps: exactly one per wanted chain, at position 1 of its parent, and
	// none to chains we do not want.
	wantJump := map[string]string{} // parent -> chain
	for _, c := range want {
		if c.Parent != "" {
			wantJump[c.Parent] = c.Name
		}
	}
	builtins := slices.Clone(Builtin[table])
	for _, parent := range builtins {
		rules := cur.Rules[parent]
		var ourIdx []int
		for i, r := range rules {
			if s.jumpTarget(r) != "" {
				ourIdx = append(ourIdx, i+1)
			}
		}
		target, wanted := wantJump[parent]
		ok := false
		if wanted {
			ok = len(ourIdx) == 1 && ourIdx[0] == 1 && s.canon(jumpSpec(target)) == rules[0]
		} else {
			ok = len(ourIdx) == 0
		}
		if ok {
			continue
		}
		changes = append(changes, Change{table, parent, fmt.Sprintf("jumps to our chains at positions %v, want one at 1 to %q", ourIdx, target)})
		for i := len(ourIdx) - 1; i >= 0; i-- {
			jumpDel = append(jumpDel, fmt.Sprintf("-D %s %d", parent, ourIdx[i]))
		}
		if wanted {
			jumpAdd = append(jumpAdd, "-I "+parent+" 1 "+jumpSpec(target))
		}
	}

	// Leftover chains of ours: emptied here, deleted in a second step.
	for name := range cur.Chains {
		if s.ours(name) && !wantNames[name] {
			stale = append(stale, name)
		}
	}
	slices.Sort(stale)
	var dropLines []string
	for _, name := range stale {
		changes = append(changes, Change{table, name, "chain not wanted"})
		decl = append(decl, ":"+name+" - [0:0]")
		dropLines = append(dropLines, "-X "+name)
	}
	if len(changes) == 0 {
		return "", "", nil, false
	}
	return restoreInput(table, decl, jumpDel, body, jumpAdd), restoreInput(table, dropLines), changes, len(jumpDel) > 0
}

// restoreInput renders one table's transaction; "" when there is nothing.
func restoreInput(table string, parts ...[]string) string {
	var b strings.Builder
	for _, part := range parts {
		for _, l := range part {
			b.WriteString(l + "\n")
		}
	}
	if b.Len() == 0 {
		return ""
	}
	return "*" + table + "\n" + b.String() + "COMMIT\n"
}

func (s *Syncer) equal(want, have []string) bool {
	if len(want) != len(have) {
		return false
	}
	for i := range want {
		if s.canon(want[i]) != have[i] {
			return false
		}
	}
	return true
}

// knows reports that every line of desired's chains in tables has been
// learnt before: learning them again would read nothing new.
func (s *Syncer) knows(desired Ruleset, tables []string) bool {
	for _, c := range desired {
		if !slices.Contains(tables, c.Table) {
			continue
		}
		for _, r := range c.Rules {
			if _, ok := s.learned[r]; !ok {
				return false
			}
		}
		if _, ok := s.learned[jumpSpec(c.Name)]; c.Parent != "" && !ok {
			return false
		}
	}
	return true
}

// learn records how the kernel printed back what we just wrote to tables,
// reading every table back in one process, which also tells the next
// Update where the tables stand. Called with s.mu held.
func (s *Syncer) learn(ctx context.Context, desired Ruleset, tables []string) {
	saved, err := s.run.Save(ctx, "")
	if err != nil {
		return // learning is an optimisation only
	}
	all := ParseSaveAll(saved)
	s.last, s.saved = all, saved
	for _, c := range desired {
		if !slices.Contains(tables, c.Table) {
			continue
		}
		cur := all[c.Table]
		if have := cur.Rules[c.Name]; len(have) == len(c.Rules) {
			for i, r := range c.Rules {
				s.learned[r] = have[i]
			}
		}
		if c.Parent != "" {
			if rules := cur.Rules[c.Parent]; len(rules) > 0 && s.jumpTarget(rules[0]) == c.Name {
				s.learned[jumpSpec(c.Name)] = rules[0]
			}
		}
	}
}

// Parsed is one table of iptables-save output.
type Parsed struct {
	Chains map[string]bool
	// Rules maps a chain to its rule specs (without "-A <chain> ").
	Rules map[string][]string
}

// ParseSave parses the output of `iptables-save -t <table>` (one table).
func ParseSave(text string) Parsed {
	p := Parsed{Chains: map[string]bool{}, Rules: map[string][]string{}}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 {
				p.Chains[f[0]] = true
			}
		case strings.HasPrefix(line, "-A "):
			rest := line[3:]
			chain, spec, _ := strings.Cut(rest, " ")
			p.Chains[chain] = true
			p.Rules[chain] = append(p.Rules[chain], spec)
		}
	}
	return p
}

// atoiOr parses n, or returns def.
func atoiOr(n string, def int) int {
	v, err := strconv.Atoi(n)
	if err != nil {
		return def
	}
	return v
}
