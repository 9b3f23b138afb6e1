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
}

impl Report {
    pub fn to_json(&self) -> String {
        let q = |v: &[u64; 5]| {
            format!(
                "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
                v[0], v[1], v[2], v[3], v[4]
            )
        };
        let o = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.1}"));
        format!(
            "{{\"subscribers\":{},\"symbols\":{},\"seconds\":{:.2},\"connect_per_sec\":{:.0},\"published\":{},\"publish_per_sec\":{:.0},\"ack_us\":{},\"deliveries\":{},\"deliveries_per_sec\":{:.0},\"latency_us\":{},\"bytes_per_sec\":{:.0},\"gaps\":{},\"conflated\":{},\"closed\":{},\"server_cpu_pct\":{},\"server_rss_mb\":{},\"server_rss_per_conn_kb\":{},\"gen_cpu_pct\":{:.1}}}",
            self.subscribers,
            self.symbols,
            self.seconds,
            self.connect_per_sec,
            self.published,
            self.publish_per_sec,
            q(&self.ack_us),
            self.deliveries,
            self.deliveries_per_sec,
            q(&self.latency_us),
            self.bytes_per_sec,
            self.gaps,
            self.conflated,
            self.closed,
            o(self.server_cpu_pct),
            o(self.server_rss_mb),
            o(self.server_rss_per_conn_kb),
            self.gen_cpu_pct
        )
    }

    pub fn to_table(&self) -> String {
        let q = |v: &[u64; 5]| {
            format!(
                "p50 {} / p90 {} / p99 {} / p99.9 {} / max {} µs",
                v[0], v[1], v[2], v[3], v[4]
            )
        };
        let o = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |x| format!("{x:.1}{unit}"));
        format!(
            "subscribers        {}\nsymbols            {}\nconnects/s         {:.0}\npublished/s        {:.0}\nack latency        {}\ndeliveries/s       {:.0}\nlatency            {}\nbytes/s            {:.0}\ngaps               {}\nconflated          {}\nclosed             {}\nserver CPU         {}\nserver RSS         {}\nRSS per connection {}\ngenerator CPU      {:.1}%\n",
            self.subscribers,
            self.symbols,
            self.connect_per_sec,
            self.publish_per_sec,
            q(&self.ack_us),
            self.deliveries_per_sec,
            q(&self.latency_us),
            self.bytes_per_sec,
            self.gaps,
            self.conflated,
            self.closed,
            o(self.server_cpu_pct, "%"),
            o(self.server_rss_mb, " MiB"),
            o(self.server_rss_per_conn_kb, " KiB"),
            self.gen_cpu_pct
        )
    }
}
