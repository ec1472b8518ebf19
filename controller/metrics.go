package controller

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ambient-redirect/ambient-redirect/dataplane"
)

// Metrics are the agent's Prometheus metrics, on their own registry.
type Metrics struct {
	Registry     *prometheus.Registry
	syncDuration prometheus.Histogram
	programmed   prometheus.Histogram
	enrolled     prometheus.Gauge
	writes       *prometheus.CounterVec
	drift        *prometheus.CounterVec
	errors       prometheus.Counter
	syncs        prometheus.Counter
}

// NewMetrics registers the metrics.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "ambient_redirect_sync_duration_seconds", Help: "Duration of one dataplane sync.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		programmed: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "ambient_redirect_event_to_programmed_seconds", Help: "Time from a pod/namespace event to its state programmed in the kernel.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		enrolled: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ambient_redirect_enrolled_pods", Help: "Ambient pods programmed on this node."}),
		writes:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambient_redirect_kernel_writes_total", Help: "Kernel writes by kind."}, []string{"kind"}),
		drift:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambient_redirect_drift_repairs_total", Help: "Kernel writes by resyncs that restored state the agent had already converged to (drift repairs), by kind."}, []string{"kind"}),
		errors:   prometheus.NewCounter(prometheus.CounterOpts{Name: "ambient_redirect_sync_errors_total", Help: "Failed syncs."}),
		syncs:    prometheus.NewCounter(prometheus.CounterOpts{Name: "ambient_redirect_syncs_total", Help: "Syncs run."}),
	}
	m.Registry.MustRegister(m.syncDuration, m.programmed, m.enrolled, m.writes, m.drift, m.errors, m.syncs,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, k := range []string{dataplane.KindIPSet, dataplane.KindLink, dataplane.KindAddr, dataplane.KindNeigh, dataplane.KindRoute, dataplane.KindRule, dataplane.KindSysctl, dataplane.KindIPTables} {
		m.writes.WithLabelValues(k)
		m.drift.WithLabelValues(k)
	}
	return m
}

// Hooks returns the controller hooks feeding these metrics.
func (m *Metrics) Hooks() Hooks {
	return Hooks{
		OnSync: func(res dataplane.Result, drift bool, enrolled int, err error) {
			m.syncs.Inc()
			m.syncDuration.Observe(res.Elapsed.Seconds())
			for k, v := range res.Writes {
				m.writes.WithLabelValues(k).Add(float64(v))
				if drift {
					m.drift.WithLabelValues(k).Add(float64(v))
				}
			}
			if err != nil {
				m.errors.Inc()
				return
			}
			m.enrolled.Set(float64(enrolled))
		},
		OnRepair: func(res dataplane.Result) {
			for k, v := range res.Writes {
				m.writes.WithLabelValues(k).Add(float64(v))
				m.drift.WithLabelValues(k).Add(float64(v))
			}
		},
		OnProgrammed: func(d time.Duration) { m.programmed.Observe(d.Seconds()) },
	}
}
