//! Random policies and random destinations: the kernel's verdict must equal the reference
//! evaluator's, every time. The seed is printed; set AGENTWALL_TEST_SEED to replay a run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agentwall::{
    clock::BootInstant,
    datapath::{Datapath, DatapathError},
    policy::{
        IdentityStatus, IdentityView, Mode, PortRange, Protocol, Rule, Subject, UnknownFlows,
        Verdict, evaluate_flow,
    },
};
use agentwall_tests::{Probe, TestEnv};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, SeedableRng, rngs::StdRng};

const V4_BASES: [[u8; 4]; 3] = [[192, 0, 2, 0], [198, 51, 100, 0], [203, 0, 113, 0]];
const PORTS: [u16; 16] = [
    1, 52, 53, 54, 79, 80, 81, 442, 443, 444, 7999, 8000, 8050, 8100, 8101, 65535,
];

fn random_v4(rng: &mut StdRng) -> Ipv4Addr {
    let b = V4_BASES[rng.random_range(0..V4_BASES.len())];
    Ipv4Addr::new(b[0], b[1], b[2], rng.random())
}

fn random_v6(rng: &mut StdRng) -> Ipv6Addr {
    // A small corner of 2001:db8::/32 so that random rules and destinations meet.
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    o[4] = rng.random_range(0..2);
    o[15] = rng.random();
    o[14] = rng.random_range(0..2);
    Ipv6Addr::from(o)
}

fn random_net(rng: &mut StdRng) -> IpNet {
    match rng.random_range(0..10) {
        0 => "0.0.0.0/0".parse().unwrap(),
        1 => "::/0".parse().unwrap(),
        2..=6 => IpNet::V4(
            Ipv4Net::new(random_v4(rng), rng.random_range(22..=32))
                .unwrap()
                .trunc(),
        ),
        _ => IpNet::V6(
            Ipv6Net::new(random_v6(rng), rng.random_range(32..=128))
                .unwrap()
                .trunc(),
        ),
    }
}

fn random_ports(rng: &mut StdRng) -> Vec<PortRange> {
    (0..rng.random_range(0..=3))
        .map(|_| {
            let a = PORTS[rng.random_range(0..PORTS.len())];
            if rng.random_bool(0.3) {
                let b = PORTS[rng.random_range(0..PORTS.len())];
                PortRange {
                    lo: a.min(b),
                    hi: a.max(b),
                }
            } else {
                PortRange::single(a)
            }
        })
        .collect()
}

fn random_rules(rng: &mut StdRng) -> Vec<Rule> {
    let now = BootInstant::now();
    (1..=rng.random_range(1..=12))
        .map(|id| Rule {
            id,
            fqdns: Vec::new(),
            to: (0..rng.random_range(1..=3))
                .map(|_| random_net(rng))
                .collect(),
            ports: random_ports(rng),
            protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Any][rng.random_range(0..3)],
            direction: agentwall::policy::Direction::Egress,
            expires: match rng.random_range(0..8) {
                0 => Some(BootInstant(now.0 - 1)),
                1 => Some(BootInstant(now.0 + 3_600_000_000_000)),
                _ => None,
            },
            ech: Box::default(),
            learned: false,
        })
        .collect()
}

fn random_flow(rng: &mut StdRng, rules: &[Rule]) -> (String, Protocol, IpAddr, u16) {
    let dest: IpAddr = if rng.random_bool(0.5) && !rules.is_empty() {
        // Somewhere inside a rule's CIDR, when it lies in the documentation ranges.
        let r = &rules[rng.random_range(0..rules.len())];
        match r.to[rng.random_range(0..r.to.len())] {
            IpNet::V4(n) if n.prefix_len() >= 22 => {
                let host: u32 = rng.random::<u32>() & !u32::from(n.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            IpNet::V6(n) if n.prefix_len() >= 32 => {
                let host: u128 = rng.random::<u128>() & !u128::from(n.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
            }
            _ => IpAddr::V4(random_v4(rng)),
        }
    } else if rng.random_bool(0.6) {
        IpAddr::V4(random_v4(rng))
    } else {
        IpAddr::V6(random_v6(rng))
    };
    // Keep every destination inside the documentation ranges.
    let in_doc = match dest {
        IpAddr::V4(v4) => V4_BASES.iter().any(|b| v4.octets()[..3] == b[..3]),
        IpAddr::V6(v6) => v6.segments()[..2] == [0x2001, 0x0db8],
    };
    let dest = if in_doc {
        dest
    } else {
        IpAddr::V4(random_v4(rng))
    };
    let port = if rng.random_bool(0.8) {
        PORTS[rng.random_range(0..PORTS.len())]
    } else {
        rng.random_range(1..=65535)
    };
    // IPv4 destinations sometimes go out as IPv4-mapped IPv6 from an AF_INET6 socket.
    let shown = match dest {
        IpAddr::V4(v4) if rng.random_bool(0.25) => IpAddr::V6(v4.to_ipv6_mapped()),
        d => d,
    };
    let (op, proto) = match rng.random_range(0..4) {
        0 => ("connect tcp", Protocol::Tcp),
        1 => ("connect udp", Protocol::Udp),
        2 => ("sendto udp", Protocol::Udp),
        _ => ("fastopen", Protocol::Tcp),
    };
    (format!("{op} {shown} {port}"), proto, dest, port)
}

#[test]
fn kernel_agrees_with_reference_evaluator_on_random_policies() {
    let seed: u64 = std::env::var("AGENTWALL_TEST_SEED")
        .ok()
        .map(|s| s.parse().expect("AGENTWALL_TEST_SEED must be a number"))
        .unwrap_or_else(rand::random);
    println!("differential seed: {seed} (replay with AGENTWALL_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let env = TestEnv::new("differential");
    let dp = Datapath::start(&env.config()).unwrap();
    let view = IdentityView {
        status: IdentityStatus::Active,
        mode: Mode::Enforce,
        not_after: None,
    };
    dp.set_identity(1, view.status, view.mode).unwrap();
    let agent = env.cgroup("agent");
    dp.bind(&agent, 1, None).unwrap();
    let mut probe = Probe::spawn(&agent);

    let (policies, per_policy) = (20, 600);
    let mut checked = 0;
    let mut mismatches = Vec::new();
    let mut denied = 0;
    for round in 0..policies {
        let rules = loop {
            let r = random_rules(&mut rng);
            match dp.set_rules(1, &r) {
                Ok(_) => break r,
                Err(DatapathError::Compile { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        };
        let gd: Vec<IpNet> = (0..rng.random_range(0..=3))
            .map(|_| random_net(&mut rng))
            .collect();
        dp.set_global_deny(&gd).unwrap();
        let flows: Vec<_> = (0..per_policy)
            .map(|_| random_flow(&mut rng, &rules))
            .collect();
        let cmds: Vec<String> = flows.iter().map(|f| f.0.clone()).collect();
        let answers = probe.batch(&cmds);
        let now = BootInstant::now();
        for ((cmd, proto, dest, port), got) in flows.iter().zip(answers) {
            let want = evaluate_flow(
                Subject::Bound {
                    view: Some(view),
                    rules: &rules,
                },
                &gd,
                UnknownFlows::Report,
                *dest,
                *port,
                *proto,
                now,
            );
            let kernel = match got.as_str() {
                "err EPERM" => Verdict::Deny,
                "err ENETUNREACH" => Verdict::Allow,
                other => panic!("unexpected answer {other:?} to {cmd:?}"),
            };
            if kernel == Verdict::Deny {
                denied += 1;
            }
            if kernel != want.verdict {
                mismatches.push(format!(
                    "round {round}: `{cmd}` kernel {kernel:?}, evaluator {:?}\n  rules {rules:?}\n  global deny {gd:?}",
                    want.verdict
                ));
            }
            checked += 1;
        }
    }
    assert!(
        mismatches.is_empty(),
        "seed {seed}: {} of {checked} differ:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(5)].join("\n")
    );
    assert!(checked >= 10_000);
    // Both verdicts must be well represented or the comparison proves little.
    assert!(
        denied > checked / 10 && denied < checked * 9 / 10,
        "{denied} of {checked} denied"
    );
}
