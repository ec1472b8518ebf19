package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/ambient-redirect/ambient-redirect/cni"
)

// The conflist is edited as text, not re-marshalled: the primary plugin's
// part of the file stays byte-for-byte as its owner wrote it, and removing
// exactly the bytes we inserted restores the file exactly. encoding/json's
// token stream (with InputOffset) finds the element boundaries, so strings
// that contain brackets or commas cannot confuse it.

// span is the byte range [start, end) of one element of the plugins array.
type span struct{ start, end int }

// conflist is the layout of a conflist's top-level plugins array.
type conflist struct {
	data    []byte
	version string // top-level cniVersion
	open    int    // offset of the plugins array's '['
	plugins []span
	ours    []int // indexes into plugins of entries of type cni.PluginType
}

// parseConflist checks that data is a JSON object with a plugins array and
// finds its elements.
func parseConflist(data []byte) (*conflist, error) {
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		return nil, fmt.Errorf("not valid JSON: %w", err)
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, errors.New("not a JSON object")
	}
	c := &conflist{data: data, open: -1}
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil { // '{'
		return nil, err
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		switch key {
		case "plugins":
			if c.open >= 0 {
				return nil, errors.New(`more than one "plugins" key`)
			}
			if err := c.scanPlugins(dec); err != nil {
				return nil, err
			}
		case "cniVersion":
			if err := dec.Decode(&c.version); err != nil {
				return nil, fmt.Errorf("cniVersion: %w", err)
			}
		default:
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, err
			}
		}
	}
	if c.open < 0 {
		return nil, errors.New(`no "plugins" array: a single-plugin config (.conf) cannot be chained; ` +
			`ambient-redirect needs the primary network config to be a conflist`)
	}
	return c, nil
}

func (c *conflist) scanPlugins(dec *json.Decoder) error {
	if tok, err := dec.Token(); err != nil {
		return err
	} else if tok != json.Delim('[') {
		return errors.New(`"plugins" is not an array`)
	}
	c.open = int(dec.InputOffset()) - 1
	prev := c.open + 1
	for dec.More() {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		end := int(dec.InputOffset())
		// Between two elements there is only white space and one comma.
		start := prev
		for start < end && strings.IndexByte(" \t\r\n,", c.data[start]) >= 0 {
			start++
		}
		if !bytes.Equal(c.data[start:end], raw) {
			return fmt.Errorf("internal error: plugins element at offset %d not where the decoder saw it", start)
		}
		var e struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(raw, &e) == nil && e.Type == cni.PluginType {
			c.ours = append(c.ours, len(c.plugins))
		}
		c.plugins = append(c.plugins, span{start, end})
		prev = end
	}
	_, err := dec.Token() // ']'
	return err
}

// others are the elements that are not ours.
func (c *conflist) others() []span {
	var out []span
	for i, s := range c.plugins {
		if !slices.Contains(c.ours, i) {
			out = append(out, s)
		}
	}
	return out
}

// entry is our element of the plugins array: the plugin's own fields, none
// of what the runtime fills in (cniVersion, name, prevResult).
type entry struct {
	Type string `json:"type"`
	cni.OwnFields
}

// layout is how the file lays out the plugins array, so that our entry looks
// like the elements around it.
type layout struct {
	sep       string // between two elements, comma included: ",\n    "
	prefix    string // indentation of an element's first line
	unit      string // one level of indentation inside an element
	newline   string // "\n" or "\r\n"
	multiline bool   // elements span several lines
}

// layout reads the style from the elements that are not ours (the last one
// is the model); there is at least one.
func (c *conflist) layout() layout {
	els := c.others()
	last := els[len(els)-1]
	raw := string(c.data[last.start:last.end])
	l := layout{sep: ", ", newline: "\n", multiline: strings.Contains(raw, "\n")}
	if n := len(els); n >= 2 && isSeparator(c.data[els[n-2].end:els[n-1].start]) {
		l.sep = string(c.data[els[n-2].end:els[n-1].start])
	} else if lead := c.data[c.open+1 : els[0].start]; isSpace(lead) {
		l.sep = "," + string(lead)
	}
	if strings.Contains(l.sep, "\r\n") || strings.Contains(raw, "\r\n") {
		l.newline = "\r\n"
	}
	if i := strings.LastIndexByte(l.sep, '\n'); i >= 0 {
		l.prefix = l.sep[i+1:]
	}
	// The model element's second line is indented by its own prefix plus one unit.
	own := ""
	if i := bytes.LastIndexByte(c.data[:last.start], '\n'); i >= 0 && isSpace(c.data[i+1:last.start]) {
		own = string(c.data[i+1 : last.start])
	}
	if i := strings.IndexByte(raw, '\n'); i >= 0 {
		line := raw[i+1:]
		ws := line[:len(line)-len(strings.TrimLeft(line, " \t"))]
		l.unit = strings.TrimPrefix(ws, own)
	}
	if l.unit == "" {
		l.unit = "  "
		if strings.Contains(l.prefix, "\t") {
			l.unit = "\t"
		}
	}
	return l
}

// render is our entry's text in layout l.
func (l layout) render(e entry) ([]byte, error) {
	if !l.multiline {
		return json.Marshal(e)
	}
	b, err := json.MarshalIndent(e, l.prefix, l.unit)
	if err != nil {
		return nil, err
	}
	if l.newline != "\n" {
		b = bytes.ReplaceAll(b, []byte("\n"), []byte(l.newline))
	}
	return b, nil
}

// withEntry returns the file with e as our only entry, and whether that
// differs from c.data. A missing entry is appended after the last element;
// one with other content is replaced where it stands (so a plugin another
// installer appended after us stays after us); one with the same content is
// left as it is, whatever its formatting; extra copies are removed.
func (c *conflist) withEntry(e entry) ([]byte, bool, error) {
	if len(c.others()) == 0 {
		return nil, false, errors.New(`"plugins" has no primary plugin to chain after`)
	}
	if len(c.ours) > 1 {
		// Drop the last copy and start over until one is left.
		out, _ := c.without(c.ours[len(c.ours)-1])
		c2, err := parseConflist(out)
		if err != nil {
			return nil, false, err
		}
		out, _, err = c2.withEntry(e)
		return out, true, err
	}
	text, err := c.layout().render(e)
	if err != nil {
		return nil, false, err
	}
	if len(c.ours) == 1 {
		s := c.plugins[c.ours[0]]
		if sameJSON(c.data[s.start:s.end], text) {
			return c.data, false, nil
		}
		return splice(c.data, s.start, s.end, text), true, nil
	}
	last := c.plugins[len(c.plugins)-1]
	ins := append([]byte(c.layout().sep), text...)
	return splice(c.data, last.end, last.end, ins), true, nil
}

// without removes element i and reports whether the result is exactly the
// file before withEntry appended it (the bytes removed are the separator and
// entry withEntry would insert into the result). When the file was edited
// around our entry since, the entry still goes, but the file cannot be
// restored byte for byte.
func (c *conflist) without(i int) ([]byte, bool) {
	s := c.plugins[i]
	switch {
	case i == len(c.plugins)-1 && i > 0:
		// The usual case: ours is last. Remove from the end of the element
		// before it, taking the comma with it.
		from := c.plugins[i-1].end
		out := splice(c.data, from, s.end, nil)
		return out, c.wouldInsert(out, c.data[from:s.end], c.data[s.start:s.end])
	case i < len(c.plugins)-1:
		// Someone appended after us: take our element and the comma after it.
		return splice(c.data, s.start, c.plugins[i+1].start, nil), false
	default:
		return splice(c.data, s.start, s.end, nil), false
	}
}

// wouldInsert reports whether withEntry, given out, would insert exactly
// removed (the entry being raw).
func (c *conflist) wouldInsert(out, removed, raw []byte) bool {
	var e entry
	if json.Unmarshal(raw, &e) != nil {
		return false
	}
	c2, err := parseConflist(out)
	if err != nil || len(c2.ours) > 0 || len(c2.plugins) == 0 {
		return false
	}
	text, err := c2.layout().render(e)
	if err != nil {
		return false
	}
	return string(removed) == c2.layout().sep+string(text)
}

func splice(data []byte, from, to int, ins []byte) []byte {
	out := make([]byte, 0, len(data)-(to-from)+len(ins))
	out = append(out, data[:from]...)
	out = append(out, ins...)
	return append(out, data[to:]...)
}

func sameJSON(a, b []byte) bool {
	var va, vb any
	return json.Unmarshal(a, &va) == nil && json.Unmarshal(b, &vb) == nil && reflect.DeepEqual(va, vb)
}

func isSpace(b []byte) bool {
	return len(bytes.Trim(b, " \t\r\n")) == 0
}

func isSeparator(b []byte) bool {
	return string(bytes.Trim(b, " \t\r\n")) == ","
}
