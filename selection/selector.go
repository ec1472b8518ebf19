package selection

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Selector is a parsed label selector in the syntax of kubectl's -l (and of
// --ztunnel-selector): comma-separated requirements "k", "!k", "k=v",
// "k==v", "k!=v", "k in (v1,v2)", "k notin (v1,v2)", "k>n" and "k<n".
// Both the agent and the CNI plugin parse with it, so they select the same
// ztunnel pods; the plugin links no k8s.io/apimachinery.
type Selector struct {
	reqs []requirement
	text string
}

type requirement struct {
	key    string
	op     string // one of the op* constants
	values []string
}

const (
	opExists    = "exists"
	opNotExists = "!"
	opEquals    = "="
	opNotEquals = "!="
	opIn        = "in"
	opNotIn     = "notin"
	opGreater   = ">"
	opLess      = "<"
)

// ParseSelector parses s; an empty s selects everything.
func ParseSelector(s string) (*Selector, error) {
	sel := &Selector{text: s}
	p := &selectorParser{toks: lexSelector(s)}
	if p.peek() == "" {
		return sel, nil
	}
	for {
		r, err := p.requirement()
		if err != nil {
			return nil, fmt.Errorf("label selector %q: %w", s, err)
		}
		sel.reqs = append(sel.reqs, r)
		switch t := p.next(); t {
		case "":
			return sel, nil
		case ",":
		default:
			return nil, fmt.Errorf("label selector %q: found %q, expected ','", s, t)
		}
	}
}

// String is the selector as it was parsed.
func (s *Selector) String() string { return s.text }

// Matches reports whether labels satisfy every requirement.
func (s *Selector) Matches(labels map[string]string) bool {
	for _, r := range s.reqs {
		if !r.matches(labels) {
			return false
		}
	}
	return true
}

func (r requirement) matches(labels map[string]string) bool {
	v, ok := labels[r.key]
	switch r.op {
	case opExists:
		return ok
	case opNotExists:
		return !ok
	case opEquals, opIn:
		return ok && slices.Contains(r.values, v)
	case opNotEquals, opNotIn:
		return !ok || !slices.Contains(r.values, v)
	case opGreater, opLess:
		if !ok {
			return false
		}
		have, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return false
		}
		want, _ := strconv.ParseInt(r.values[0], 10, 64) // checked when parsed
		if r.op == opGreater {
			return have > want
		}
		return have < want
	}
	return false
}

// lexSelector splits s into tokens: identifiers, and the operators and
// punctuation "!", "=", "==", "!=", "<", ">", "(", ")", ",".
func lexSelector(s string) []string {
	// A NUL ends the input, as in the API machinery's lexer.
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	var toks []string
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
		case c == '!' || c == '=':
			if i+1 < len(s) && s[i+1] == '=' {
				toks = append(toks, s[i:i+2])
				i += 2
			} else {
				toks = append(toks, s[i:i+1])
				i++
			}
		case strings.IndexByte("<>(),", c) >= 0:
			toks = append(toks, s[i:i+1])
			i++
		default:
			j := i
			for j < len(s) && strings.IndexByte(" \t\n\r\f\v!=<>(),", s[j]) < 0 {
				j++
			}
			toks = append(toks, s[i:j])
			i = j
		}
	}
	return toks
}

type selectorParser struct {
	toks []string
	pos  int
}

// peek is the next token, "" at the end.
func (p *selectorParser) peek() string {
	if p.pos < len(p.toks) {
		return p.toks[p.pos]
	}
	return ""
}

func (p *selectorParser) next() string {
	t := p.peek()
	if p.pos < len(p.toks) {
		p.pos++
	}
	return t
}

func isIdentifier(t string) bool {
	return t != "" && strings.IndexByte("!=<>(),", t[0]) < 0
}

func (p *selectorParser) requirement() (requirement, error) {
	var r requirement
	if p.peek() == "!" {
		p.next()
		r.key, r.op = p.next(), opNotExists
		if !isIdentifier(r.key) {
			return r, fmt.Errorf("found %q, expected a key after '!'", r.key)
		}
		return r, validKey(r.key)
	}
	r.key = p.next()
	if !isIdentifier(r.key) {
		return r, fmt.Errorf("found %q, expected a key", r.key)
	}
	if err := validKey(r.key); err != nil {
		return r, err
	}
	switch op := p.next(); op {
	case "", ",":
		if op == "," {
			p.pos--
		}
		r.op = opExists
		return r, nil
	case "=", "==", "!=":
		r.op = opEquals
		if op == "!=" {
			r.op = opNotEquals
		}
		v := ""
		if t := p.peek(); isIdentifier(t) {
			v = p.next()
		} else if t != "" && t != "," {
			return r, fmt.Errorf("found %q, expected a value", t)
		}
		r.values = []string{v}
	case ">", "<":
		r.op = op
		v := p.next()
		if !isIdentifier(v) {
			return r, fmt.Errorf("found %q, expected an integer", v)
		}
		if _, err := strconv.ParseInt(v, 10, 64); err != nil {
			return r, fmt.Errorf("%q: for '<' and '>' the value must be an integer", v)
		}
		r.values = []string{v}
		return r, nil
	case "in", "notin":
		r.op = op
		if t := p.next(); t != "(" {
			return r, fmt.Errorf("found %q, expected '('", t)
		}
		for {
			v := ""
			if isIdentifier(p.peek()) {
				v = p.next()
			}
			r.values = append(r.values, v)
			t := p.next()
			if t == ")" {
				break
			}
			if t != "," {
				return r, fmt.Errorf("found %q, expected ',' or ')'", t)
			}
		}
	default:
		return r, fmt.Errorf("found %q, expected an operator", op)
	}
	for _, v := range r.values {
		if err := validValue(v); err != nil {
			return r, err
		}
	}
	return r, nil
}

var (
	// nameRE is a label name, or a label value when not empty.
	nameRE = regexp.MustCompile(`^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`)
	// dnsSubdomainRE is a key's prefix.
	dnsSubdomainRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
)

// validKey checks a label key: an optional DNS subdomain prefix and '/',
// then a name of at most 63 characters.
func validKey(k string) error {
	name := k
	if prefix, rest, ok := strings.Cut(k, "/"); ok {
		if prefix == "" || len(prefix) > 253 || !dnsSubdomainRE.MatchString(prefix) {
			return fmt.Errorf("key %q: the prefix must be a DNS subdomain", k)
		}
		name = rest
	}
	if name == "" || len(name) > 63 || !nameRE.MatchString(name) {
		return fmt.Errorf("key %q: the name must be 63 characters or less of alphanumerics, '-', '_' or '.', beginning and ending with an alphanumeric", k)
	}
	return nil
}

// validValue checks a label value: empty, or a name of at most 63 characters.
func validValue(v string) error {
	if v != "" && (len(v) > 63 || !nameRE.MatchString(v)) {
		return fmt.Errorf("value %q: must be empty or 63 characters or less of alphanumerics, '-', '_' or '.', beginning and ending with an alphanumeric", v)
	}
	return nil
}
