//! Loads and pins the datapath like a node would, binds one agent cgroup, prints `ready`, and
//! then waits to be killed: the restart test SIGKILLs it and checks enforcement survives.
//!
//! Usage: aw-loader ATTACH_CGROUP BPFFS_DIR AGENT_CGROUP

use agentwall::{
    cgroup::Cgroup,
    datapath::{Datapath, DatapathConfig},
    policy::{IdentityStatus, Mode, Protocol, Rule},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [attach, bpffs, agent] = args.as_slice() else {
        panic!("usage: aw-loader ATTACH_CGROUP BPFFS_DIR AGENT_CGROUP");
    };
    let dp = Datapath::start(&DatapathConfig::new(attach, bpffs)).expect("start");
    dp.set_identity(1, IdentityStatus::Active, Mode::Enforce)
        .expect("identity");
    dp.set_rules(
        1,
        &[Rule {
            id: 1,
            fqdns: Vec::new(),
            to: vec!["192.0.2.0/24".parse().unwrap()],
            ports: vec!["443".parse().unwrap()],
            protocol: Protocol::Tcp,
            direction: agentwall::policy::Direction::Egress,
            expires: None,
            ech: Box::default(),
            learned: false,
        }],
    )
    .expect("rules");
    dp.bind(&Cgroup::open(agent).expect("agent cgroup"), 1, None)
        .expect("bind");
    let lsm = match dp.socket_families() {
        agentwall::datapath::SocketFamilies::Enforced => "lsm",
        agentwall::datapath::SocketFamilies::Unenforced(_) => "no-lsm",
    };
    println!("ready {} {lsm}", dp.start_report().attached);
    loop {
        std::thread::park();
    }
}
