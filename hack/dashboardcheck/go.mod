module tweetbot.dev/hack/dashboardcheck

// Checks the chart's Grafana dashboards against the schema of the Grafana Foundation SDK (Apache-2.0).

go 1.24.0

require github.com/grafana/grafana-foundation-sdk/go v0.0.22
