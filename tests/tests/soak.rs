//! Two minutes of the soak run (`cargo xtask soak` runs it longer): churn of launches,
//! exits, renewals, pushes, revocations, DNS lookups and a control plane restart, with every
//! verdict checked. No verdict may be wrong, every denial must be stored at the control plane
//! or counted lost, and neither process may grow once warm.

#[test]
fn two_minutes_of_churn_leave_no_wrong_verdict_no_uncounted_record_and_no_growth() {
    let report = agentwall_tests::soak::run(std::time::Duration::from_secs(120));
    println!("{report}");
    assert!(report.problems().is_empty(), "{report}");
    // The churn happened.
    assert!(report.launches >= 10, "{report}");
    assert!(report.renewals >= 1 && report.revocations >= 1, "{report}");
    assert!(report.pushes >= 5 && report.cp_restarts == 1, "{report}");
    assert!(report.denials_made > 0, "{report}");
}
