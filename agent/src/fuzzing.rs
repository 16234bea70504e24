//! What each fuzz target (`fuzz/`) feeds agentwall, shared with the test that replays every kept
//! input (`tests/tests/fuzz_regressions.rs`), so both drive the same code. No input may panic.

/// The policy parser.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = crate::policy::source::parse_sources(vec![("fuzz.yaml".into(), text)]);
}

/// The DNS proxy's reading of a query and of an answer to it.
pub fn dns(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (query, answer) = rest.split_at(len);
    let _ = crate::dns::proxy::examine_untrusted(query, answer);
}

/// The control plane's decoding of a report body.
pub fn cp_report(data: &[u8]) {
    let Some((flag, body)) = data.split_first() else {
        return;
    };
    if let Ok((batch, bytes)) = crate::control_plane::ReportBatch::decode(body, flag & 1 == 1) {
        assert!(batch.records.len() <= crate::control_plane::MAX_BATCH_RECORDS);
        assert!(bytes as u64 <= crate::control_plane::MAX_BATCH_BYTES);
        assert!(
            batch
                .records
                .iter()
                .all(|r| r.record.get().len() <= crate::control_plane::MAX_RECORD_BYTES)
        );
        // The chain check reads what nodes sent, in any order here: it never panics, and
        // lists at most its bound.
        let mut check = crate::control_plane::chain::ChainCheck::new("fuzz");
        for r in &batch.records {
            check.record(r.rid, r.record.get());
            check.loss(r.record.get());
        }
        let report = check.finish();
        assert!(report.gaps.len() <= crate::control_plane::chain::LISTED);
        assert!(report.breaks.len() <= crate::control_plane::chain::LISTED);
    }
}

/// The control plane's reading and validation of a policy push.
pub fn cp_push(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<crate::control_plane::PushRequest>(data) {
        let _ = crate::control_plane::validate(&req.files);
    }
}
