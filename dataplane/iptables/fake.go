package iptables

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
)

// Fake is an in-memory Runner with iptables-restore --noflush semantics:
// a transaction applies whole or not at all.
type Fake struct {
	mu       sync.Mutex
	tables   map[string]*fakeTable
	Restores []string // every successful restore input, in order
	Saves    int      // how many times the tables were read
	failNext error
}

type fakeTable struct {
	order []string
	rules map[string][]string
}

var _ Runner = (*Fake)(nil)

// NewFake returns a Fake with empty built-in chains.
func NewFake() *Fake {
	f := &Fake{tables: map[string]*fakeTable{}}
	for t, chains := range Builtin {
		f.tables[t] = &fakeTable{order: slices.Clone(chains), rules: map[string][]string{}}
	}
	return f
}

// FailNextRestore makes the next Restore fail with err (and change nothing).
func (f *Fake) FailNextRestore(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failNext = err
}

// Backend implements Runner.
func (f *Fake) Backend() string { return "fake" }

// Save implements Runner.
func (f *Fake) Save(_ context.Context, table string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Saves++
	if table == "" {
		var b strings.Builder
		for _, name := range slices.Sorted(maps.Keys(f.tables)) {
			b.WriteString(f.save(name))
		}
		return b.String(), nil
	}
	if _, ok := f.tables[table]; !ok {
		return "", fmt.Errorf("fake: no table %q", table)
	}
	return f.save(table), nil
}

func (f *Fake) save(table string) string {
	t := f.tables[table]
	var b strings.Builder
	fmt.Fprintf(&b, "*%s\n", table)
	for _, c := range t.order {
		pol := "-"
		if slices.Contains(Builtin[table], c) {
			pol = "ACCEPT"
		}
		fmt.Fprintf(&b, ":%s %s [0:0]\n", c, pol)
	}
	for _, c := range t.order {
		for _, r := range t.rules[c] {
			fmt.Fprintf(&b, "-A %s %s\n", c, r)
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// Append adds a rule as another agent would (for tests).
func (f *Fake) Append(table, chain, rule string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.tables[table]
	if !slices.Contains(t.order, chain) {
		t.order = append(t.order, chain)
	}
	t.rules[chain] = append(t.rules[chain], rule)
}

// Delete removes rule number n (1-based) of a chain (for drift tests).
func (f *Fake) Delete(table, chain string, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.tables[table]
	t.rules[chain] = slices.Delete(t.rules[chain], n-1, n)
}

// Restore implements Runner.
func (f *Fake) Restore(_ context.Context, input string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	// Work on copies; commit only if every line applied.
	work := map[string]*fakeTable{}
	for name, t := range f.tables {
		work[name] = &fakeTable{order: slices.Clone(t.order), rules: maps.Clone(t.rules)}
		for c, r := range t.rules {
			work[name].rules[c] = slices.Clone(r)
		}
	}
	var cur *fakeTable
	var curName string
	for i, line := range strings.Split(input, "\n") {
		line = strings.TrimSpace(line)
		fail := func(format string, a ...any) error {
			return fmt.Errorf("fake iptables-restore line %d (%q): %s", i+1, line, fmt.Sprintf(format, a...))
		}
		if line == "" || strings.HasPrefix(line, "#") || line == "COMMIT" {
			continue
		}
		if strings.HasPrefix(line, "*") {
			curName = line[1:]
			cur = work[curName]
			if cur == nil {
				return fail("no such table")
			}
			continue
		}
		if cur == nil {
			return fail("no table")
		}
		if strings.HasPrefix(line, ":") {
			name := strings.Fields(line[1:])[0]
			if !slices.Contains(cur.order, name) {
				cur.order = append(cur.order, name)
			}
			if !slices.Contains(Builtin[curName], name) {
				cur.rules[name] = nil
			}
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return fail("short line")
		}
		op, chain := f[0], f[1]
		if !slices.Contains(cur.order, chain) {
			return fail("no chain %s", chain)
		}
		rest := strings.Join(f[2:], " ")
		switch op {
		case "-A":
			if err := checkTarget(cur, rest); err != nil {
				return fail("%v", err)
			}
			cur.rules[chain] = append(cur.rules[chain], rest)
		case "-I":
			pos := 1
			if len(f) > 2 {
				if n := atoiOr(f[2], -1); n > 0 {
					pos = n
					rest = strings.Join(f[3:], " ")
				}
			}
			if pos > len(cur.rules[chain])+1 {
				return fail("index out of range")
			}
			if err := checkTarget(cur, rest); err != nil {
				return fail("%v", err)
			}
			cur.rules[chain] = slices.Insert(cur.rules[chain], pos-1, rest)
		case "-D":
			if n := atoiOr(rest, -1); n > 0 {
				if n > len(cur.rules[chain]) {
					return fail("index out of range")
				}
				cur.rules[chain] = slices.Delete(cur.rules[chain], n-1, n)
			} else {
				i := slices.Index(cur.rules[chain], rest)
				if i < 0 {
					return fail("no such rule")
				}
				cur.rules[chain] = slices.Delete(cur.rules[chain], i, i+1)
			}
		case "-F":
			cur.rules[chain] = nil
		case "-X":
			if len(cur.rules[chain]) > 0 {
				return fail("chain not empty")
			}
			for c, rules := range cur.rules {
				for _, r := range rules {
					if strings.HasSuffix(r, "-j "+chain) {
						return fail("chain referenced from %s", c)
					}
				}
			}
			cur.order = slices.DeleteFunc(cur.order, func(s string) bool { return s == chain })
			delete(cur.rules, chain)
		default:
			return fail("unsupported op")
		}
	}
	f.tables = work
	f.Restores = append(f.Restores, input)
	return nil
}

func checkTarget(t *fakeTable, rule string) error {
	f := strings.Fields(rule)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "-j" && strings.ToUpper(f[i+1]) != f[i+1] && !slices.Contains(t.order, f[i+1]) {
			return fmt.Errorf("jump to missing chain %s", f[i+1])
		}
	}
	return nil
}
