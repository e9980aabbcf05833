//! kube-proxy's histogram buckets (`pkg/proxy/metrics`), so that `histogram_quantile` over
//! kubenft's series and kube-proxy's gives comparable answers.

/// `ExponentialBuckets(0.001, 2, 15)`: 1 ms to 16.384 s. kube-proxy's sync durations
/// (full, partial and both) and the conntrack reconciler's.
pub fn sync() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

/// `kubeproxy_network_programming_duration_seconds`: component-base's `MergeBuckets` of
/// 0.25 s and 0.5 s, every second to 59 s, every 5 s to 115 s and every 30 s to 5 min, after
/// the 0 that `MergeBuckets` starts its result with.
pub fn network_programming() -> Vec<f64> {
    let linear =
        |start: f64, width: f64, count: u32| (0..count).map(move |i| start + width * f64::from(i));
    std::iter::once(0.0)
        .chain(linear(0.25, 0.25, 2))
        .chain(linear(1.0, 1.0, 59))
        .chain(linear(60.0, 5.0, 12))
        .chain(linear(120.0, 30.0, 7))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn network_programming_buckets_are_kube_proxys() {
        let b = super::network_programming();
        assert_eq!(b.len(), 81);
        assert_eq!(&b[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(b[62], 60.0);
        assert_eq!(b[73], 115.0);
        assert_eq!(b[74], 120.0);
        assert_eq!(b[80], 300.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        let sync: Vec<f64> = super::sync().collect();
        assert_eq!(sync.len(), 15);
        assert!((sync[14] - 16.384).abs() < 1e-9);
    }
}
