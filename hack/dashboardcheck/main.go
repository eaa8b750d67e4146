// Command dashboardcheck reads Grafana dashboard JSON files strictly into the Grafana Foundation SDK's
// dashboard type (Apache-2.0; Grafana's own schema code is AGPL): a field the schema does not have, a value of
// the wrong type, a missing required field, a panel type or a query whose datasource type the SDK does not
// know, each fails. (The SDK reads the options of an unknown panel type, and a query whose datasource type it
// cannot tell, as untyped bags without complaint: this refuses both.)
//
//	dashboardcheck FILE...   # exit 1, with every error, if any file is not a valid dashboard
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/cog/variants"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dashboardcheck FILE...")
		os.Exit(2)
	}
	plugins.RegisterDefaultPlugins() // the panel and query types, for their strict readers
	failed := false
	for _, path := range os.Args[1:] {
		for _, err := range check(path) {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}

func check(path string) []error {
	content, err := os.ReadFile(path)
	if err != nil {
		return []error{err}
	}
	var errs []error
	var board dashboard.Dashboard
	if err := board.UnmarshalJSONStrict(content); failed(err) {
		errs = append(errs, err)
	} else if err := board.Validate(); failed(err) {
		errs = append(errs, err)
	}
	// The panels again, one by one: the SDK's strict reader of a panel-or-row drops the panel it read (it
	// returns on its empty error list before keeping it), so board.Panels holds none to look at.
	var raw struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(content, &raw); err != nil {
		return append(errs, err)
	}
	return append(errs, panels("panels", raw.Panels)...)
}

func panels(where string, items []json.RawMessage) []error {
	var errs []error
	for i, item := range items {
		at := where + "[" + strconv.Itoa(i) + "]"
		var row struct {
			Type   string            `json:"type"`
			Panels []json.RawMessage `json:"panels"`
		}
		if err := json.Unmarshal(item, &row); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at, err))
			continue
		}
		if row.Type == "row" {
			errs = append(errs, panels(at+".panels", row.Panels)...)
			continue
		}
		var panel dashboard.Panel
		if err := panel.UnmarshalJSONStrict(item); failed(err) {
			continue // reported by the dashboard's read
		}
		errs = append(errs, known(at, panel)...)
	}
	return errs
}

// failed tells an error from the SDK's empty list of errors: its strict readers return their list even when
// it is empty, which as an `error` is not nil.
func failed(err error) bool {
	var list cog.BuildErrors
	if errors.As(err, &list) {
		return len(list) > 0
	}
	return err != nil
}

// known refuses what the strict reader lets through as an untyped bag: a panel type without a schema, and a
// query without a datasource type (on itself or its panel) that has one.
func known(where string, panel dashboard.Panel) []error {
	var errs []error
	if _, found := cog.ConfigForPanelcfgVariant(panel.Type); !found {
		errs = append(errs, fmt.Errorf("%s (%q): panel type %q has no schema in the SDK", where, title(panel), panel.Type))
	}
	for i, target := range panel.Targets {
		if _, unknown := target.(variants.UnknownDataquery); unknown {
			errs = append(errs, fmt.Errorf("%s (%q).targets[%d]: no datasource type the SDK has a query schema for", where, title(panel), i))
		}
	}
	return errs
}

func title(panel dashboard.Panel) string {
	if panel.Title == nil {
		return ""
	}
	return *panel.Title
}
