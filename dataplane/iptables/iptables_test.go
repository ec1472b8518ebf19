package iptables

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

var testRules = Ruleset{
	{Table: "mangle", Name: "ztunnel-PREROUTING", Parent: "PREROUTING", Rules: []string{"-p tcp -j MARK --set-xmark 0x100/0x100", "-j RETURN"}},
	{Table: "nat", Name: "ztunnel-POSTROUTING", Parent: "POSTROUTING", Rules: []string{"-m mark --mark 0x100/0x100 -j ACCEPT"}},
}

func TestSyncCreatesThenNoops(t *testing.T) {
	f := NewFake()
	s := NewSyncer(f, "ztunnel-")
	res, err := s.Sync(context.Background(), testRules, false)
	if err != nil || res.Restores != 1 {
		t.Fatalf("first sync: %+v %v", res, err)
	}
	// One process, one transaction per table, declaring only our chains.
	if want := "*mangle\n:ztunnel-PREROUTING - [0:0]\n-A ztunnel-PREROUTING -p tcp -j MARK --set-xmark 0x100/0x100\n-A ztunnel-PREROUTING -j RETURN\n-I PREROUTING 1 -m comment --comment ambient-redirect -j ztunnel-PREROUTING\nCOMMIT\n" +
		"*nat\n:ztunnel-POSTROUTING - [0:0]\n-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT\n-I POSTROUTING 1 -m comment --comment ambient-redirect -j ztunnel-POSTROUTING\nCOMMIT\n"; f.Restores[0] != want {
		t.Fatalf("restore input:\n%s\nwant:\n%s", f.Restores[0], want)
	}
	res, err = s.Sync(context.Background(), testRules, false)
	if err != nil || res.Restores != 0 || len(res.Changes) != 0 {
		t.Fatalf("second sync: %+v %v", res, err)
	}
}

func TestSyncMovesJumpBackToPositionOne(t *testing.T) {
	f := NewFake()
	s := NewSyncer(f, "ztunnel-")
	if _, err := s.Sync(context.Background(), testRules, false); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.tables["mangle"].rules["PREROUTING"] = []string{"-j KUBE-X", "-m comment --comment ambient-redirect -j ztunnel-PREROUTING", "-j ztunnel-PREROUTING"}
	f.mu.Unlock()
	if _, err := s.Sync(context.Background(), testRules, false); err != nil {
		t.Fatal(err)
	}
	out, _ := f.Save(context.Background(), "mangle")
	if !strings.Contains(out, "-A PREROUTING -m comment --comment ambient-redirect -j ztunnel-PREROUTING\n-A PREROUTING -j KUBE-X\n-A ztunnel") {
		t.Fatalf("want exactly one jump, first, foreign rule kept:\n%s", out)
	}
}

func TestSyncRemovesStaleChainsAndCleansUp(t *testing.T) {
	f := NewFake()
	s := NewSyncer(f, "ztunnel-")
	old := append(Ruleset{{Table: "filter", Name: "ztunnel-OLD", Parent: "FORWARD", Rules: []string{"-j ACCEPT"}}}, testRules...)
	if _, err := s.Sync(context.Background(), old, false); err != nil {
		t.Fatal(err)
	}
	f.Append("filter", "FORWARD", "-j DROP") // someone else's
	if _, err := s.Sync(context.Background(), testRules, false); err != nil {
		t.Fatal(err)
	}
	out, _ := f.Save(context.Background(), "filter")
	if strings.Contains(out, "ztunnel-OLD") || !strings.Contains(out, "-A FORWARD -j DROP") {
		t.Fatalf("stale chain must go, foreign rule stay:\n%s", out)
	}
	if _, err := s.Sync(context.Background(), nil, false); err != nil {
		t.Fatal(err)
	}
	all, _ := f.Save(context.Background(), "")
	if strings.Contains(all, "ztunnel-") {
		t.Fatalf("cleanup left chains:\n%s", all)
	}
}

func TestSyncDryRunWritesNothing(t *testing.T) {
	f := NewFake()
	s := NewSyncer(f, "ztunnel-")
	res, err := s.Sync(context.Background(), testRules, true)
	if err != nil || len(res.Changes) != 4 || res.Restores != 0 || len(f.Restores) != 0 {
		t.Fatalf("dry run: %+v %v %d", res, err, len(f.Restores))
	}
}

func TestSyncRestoreFailureIsAnError(t *testing.T) {
	f := NewFake()
	s := NewSyncer(f, "ztunnel-")
	f.FailNextRestore(errors.New("xtables lock"))
	if _, err := s.Sync(context.Background(), testRules, false); err == nil {
		t.Fatal("a failed restore must be an error")
	}
	res, err := s.Sync(context.Background(), testRules, true)
	if err != nil || len(res.Changes) == 0 {
		t.Fatal("after a failed restore the rules must still be reported as missing")
	}
}

// A kernel that prints rules differently from how we wrote them costs one
// write, then the printed form is learnt.
type rewritingRunner struct{ *Fake }

func (r rewritingRunner) Restore(ctx context.Context, in string) error {
	return r.Fake.Restore(ctx, strings.ReplaceAll(in, "-p tcp -j MARK", "-p tcp -m tcp -j MARK"))
}

func TestSyncLearnsPrintedForm(t *testing.T) {
	r := rewritingRunner{NewFake()}
	s := NewSyncer(r, "ztunnel-")
	for i, want := range []int{1, 0, 0} {
		res, err := s.Sync(context.Background(), testRules, false)
		if err != nil || res.Restores != want {
			t.Fatalf("sync %d: %d restores, want %d (%v)", i, res.Restores, want, err)
		}
	}
}

func TestParseSaveAll(t *testing.T) {
	text := "# Generated\n*mangle\n:PREROUTING ACCEPT [0:0]\n:ztunnel-X - [0:0]\n-A PREROUTING -j ztunnel-X\n-A ztunnel-X -j RETURN\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
	all := ParseSaveAll(text)
	if len(all) != 2 || !all["mangle"].Chains["ztunnel-X"] || all["mangle"].Rules["ztunnel-X"][0] != "-j RETURN" || len(all["nat"].Rules) != 0 {
		t.Fatalf("%+v", all)
	}
}

// countingRunner counts the processes a real runner would start.
type countingRunner struct {
	*Fake
	saves, restores int
}

func (r *countingRunner) Save(ctx context.Context, table string) (string, error) {
	r.saves++
	return r.Fake.Save(ctx, table)
}

func (r *countingRunner) Restore(ctx context.Context, in string) error {
	r.restores++
	return r.Fake.Restore(ctx, in)
}

// Update starts from what the syncer last read back; it reads again when
// the jumps it would delete may have moved, and after Forget.
func TestUpdateStartsFromLastReadBack(t *testing.T) {
	r := &countingRunner{Fake: NewFake()}
	s := NewSyncer(r, "ztunnel-")
	ctx := context.Background()
	if _, err := s.Sync(ctx, testRules, false); err != nil {
		t.Fatal(err)
	}
	if r.saves != 2 || r.restores != 1 { // read, write all tables, learn
		t.Fatalf("first sync: %d saves, %d restores", r.saves, r.restores)
	}
	next := slices.Clone(testRules)
	next[0].Rules = append([]string{"-j ACCEPT"}, next[0].Rules...)
	if _, err := s.Update(ctx, next); err != nil {
		t.Fatal(err)
	}
	if r.saves != 3 || r.restores != 2 { // no read before the write; learn the new line
		t.Fatalf("update: %d saves, %d restores", r.saves, r.restores)
	}
	if res, err := s.Update(ctx, testRules); err != nil || res.Restores != 1 || r.saves != 3 {
		t.Fatalf("update back: %+v %v, %d saves (every line learnt: nothing to read)", res, err, r.saves)
	}
	// Unknown (nothing read back since the last write): Update reads.
	if res, err := s.Update(ctx, testRules); err != nil || res.Restores != 0 || r.saves != 4 {
		t.Fatalf("update unchanged: %+v %v, %d saves", res, err, r.saves)
	}
	// Jumps moved since the last read: deleting one by position could hit
	// a foreign rule, so Update reads again and sees where they are.
	r.mu.Lock()
	r.Fake.tables["mangle"].rules["PREROUTING"] = []string{"-j KUBE-X", "-m comment --comment ambient-redirect -j ztunnel-PREROUTING"}
	r.mu.Unlock()
	if _, err := s.Update(ctx, nil); err != nil {
		t.Fatal(err)
	}
	out, _ := r.Fake.Save(ctx, "mangle")
	if strings.Contains(out, "ztunnel-") || !strings.Contains(out, "-A PREROUTING -j KUBE-X") {
		t.Fatalf("want our chains gone and the foreign rule kept:\n%s", out)
	}
}
