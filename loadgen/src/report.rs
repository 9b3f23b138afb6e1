//! The report of one run, as a table or JSON.

/// The report of one run.
#[derive(Debug, Default)]
pub struct Report {
    pub subscribers: usize,
    pub symbols: usize,
    pub seconds: f64,
    pub connect_per_sec: f64,
    pub published: u64,
    pub publish_per_sec: f64,
    pub ack_us: [u64; 5],
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub latency_us: [u64; 5],
    pub bytes_per_sec: f64,
    pub gaps: u64,
    pub conflated: u64,
    pub closed: u64,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub server_rss_per_conn_kb: Option<f64>,
    pub gen_cpu_pct: f64,
    /// Deliveries owed for the ticks published while measuring (each tick
    /// times the subscribers watching its symbol).
    pub owed: u64,
    /// Deliveries made over deliveries owed, in % (in-flight ticks at the
    /// window's edges make it ±latency/duration).
    pub delivered_pct: Option<f64>,
    /// Server CPU per delivery made.
    pub server_us_per_delivery: Option<f64>,
    /// The generator's own CPU per message it received (keep it well below
    /// the server's, or the figures measure the generator).
    pub gen_us_per_msg: Option<f64>,
}

/// One figure of the report, with how each format shows it.
enum Value {
    Count(u64),
    Rate(f64),
    Seconds(f64),
    Percent(f64),
    Quantiles([u64; 5]),
    Measured(Option<f64>, &'static str),
    /// Microseconds with three decimals (costs per message).
    Micros(Option<f64>),
}

impl Report {
    /// Every figure once: its JSON key, its table label (`None`: JSON only)
    /// and its value; both formats render this list.
    fn fields(&self) -> [(&'static str, Option<&'static str>, Value); 22] {
        use Value::*;
        [
            ("subscribers", Some("subscribers"), Count(self.subscribers as u64)),
            ("symbols", Some("symbols"), Count(self.symbols as u64)),
            ("seconds", None, Seconds(self.seconds)),
            ("connect_per_sec", Some("connects/s"), Rate(self.connect_per_sec)),
            ("published", None, Count(self.published)),
            ("publish_per_sec", Some("published/s"), Rate(self.publish_per_sec)),
            ("ack_us", Some("ack latency"), Quantiles(self.ack_us)),
            ("deliveries", None, Count(self.deliveries)),
            ("owed", None, Count(self.owed)),
            (
                "delivered_pct",
                Some("delivered/owed"),
                Measured(self.delivered_pct, "%"),
            ),
            (
                "deliveries_per_sec",
                Some("deliveries/s"),
                Rate(self.deliveries_per_sec),
            ),
            ("latency_us", Some("latency"), Quantiles(self.latency_us)),
            ("bytes_per_sec", Some("bytes/s"), Rate(self.bytes_per_sec)),
            ("gaps", Some("gaps"), Count(self.gaps)),
            ("conflated", Some("conflated"), Count(self.conflated)),
            ("closed", Some("closed"), Count(self.closed)),
            ("server_cpu_pct", Some("server CPU"), Measured(self.server_cpu_pct, "%")),
            (
                "server_rss_mb",
                Some("server RSS"),
                Measured(self.server_rss_mb, " MiB"),
            ),
            (
                "server_rss_per_conn_kb",
                Some("RSS per connection"),
                Measured(self.server_rss_per_conn_kb, " KiB"),
            ),
            ("gen_cpu_pct", Some("generator CPU"), Percent(self.gen_cpu_pct)),
            (
                "server_us_per_delivery",
                Some("server CPU/deliv."),
                Micros(self.server_us_per_delivery),
            ),
            ("gen_us_per_msg", Some("gen. CPU/message"), Micros(self.gen_us_per_msg)),
        ]
    }

    pub fn to_json(&self) -> String {
        let body: Vec<String> = self
            .fields()
            .into_iter()
            .map(|(key, _, v)| {
                let v = match v {
                    Value::Count(n) => n.to_string(),
                    Value::Rate(x) => format!("{x:.0}"),
                    Value::Seconds(x) => format!("{x:.2}"),
                    Value::Percent(x) => format!("{x:.1}"),
                    Value::Quantiles(q) => format!(
                        "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
                        q[0], q[1], q[2], q[3], q[4]
                    ),
                    Value::Measured(x, _) => x.map_or("null".to_string(), |x| format!("{x:.1}")),
                    Value::Micros(x) => x.map_or("null".to_string(), |x| format!("{x:.3}")),
                };
                format!("\"{key}\":{v}")
            })
            .collect();
        format!("{{{}}}", body.join(","))
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        for (_, label, v) in self.fields() {
            let Some(label) = label else { continue };
            let v = match v {
                Value::Count(n) => n.to_string(),
                Value::Rate(x) | Value::Seconds(x) => format!("{x:.0}"),
                Value::Percent(x) => format!("{x:.1}%"),
                Value::Quantiles(q) => format!(
                    "p50 {} / p90 {} / p99 {} / p99.9 {} / max {} µs",
                    q[0], q[1], q[2], q[3], q[4]
                ),
                Value::Measured(x, unit) => x.map_or("-".to_string(), |x| format!("{x:.1}{unit}")),
                Value::Micros(x) => x.map_or("-".to_string(), |x| format!("{x:.3} µs")),
            };
            out.push_str(&format!("{label:<18} {v}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn both_formats_render_the_one_field_list() {
        let r = Report {
            subscribers: 3,
            seconds: 1.5,
            publish_per_sec: 1234.4,
            ack_us: [1, 2, 3, 4, 5],
            server_cpu_pct: Some(12.34),
            gen_cpu_pct: 7.0,
            ..Report::default()
        };
        let json = r.to_json();
        assert!(
            json.starts_with("{\"subscribers\":3,\"symbols\":0,\"seconds\":1.50,"),
            "{json}"
        );
        assert!(json.contains("\"publish_per_sec\":1234,"), "{json}");
        assert!(
            json.contains("\"ack_us\":{\"p50\":1,\"p90\":2,\"p99\":3,\"p999\":4,\"max\":5}"),
            "{json}"
        );
        assert!(
            json.contains("\"server_cpu_pct\":12.3,\"server_rss_mb\":null,"),
            "{json}"
        );
        assert!(
            json.ends_with("\"gen_cpu_pct\":7.0,\"server_us_per_delivery\":null,\"gen_us_per_msg\":null}"),
            "{json}"
        );
        let table = r.to_table();
        assert!(table.contains("published/s        1234\n"), "{table}");
        assert!(table.contains("server CPU         12.3%\n"), "{table}");
        assert!(table.contains("server RSS         -\n"), "{table}");
        assert!(!table.contains("seconds"), "JSON-only fields stay out of the table");
    }
}
