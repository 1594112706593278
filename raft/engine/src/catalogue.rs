//! The size catalogue: t-shirt sizes → cpu, memory, replicas and cost per hour, smallest first.
//! It lives in the replicated cluster settings, so every node prices and validates alike.

use runtimeai_model::{ResourceProfile, Runtime, RuntimeSpec, RuntimeState, SizeEntry};

/// Bytes in a Kubernetes quantity such as `512Mi`, `8Gi` or `1G`.
pub fn quantity_bytes(value: &str) -> Option<u64> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(factor)
}

/// A view of the catalogue with the questions the engine asks of it.
#[derive(Debug, Clone, Copy)]
pub struct Catalogue<'a> {
    pub sizes: &'a [SizeEntry],
}

/// Hours in a month, for monthly budgets (365 × 24 / 12).
pub const HOURS_PER_MONTH: f64 = 730.0;

impl<'a> Catalogue<'a> {
    pub fn new(sizes: &'a [SizeEntry]) -> Self {
        Catalogue { sizes }
    }

    /// The position of a size by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.sizes.iter().position(|s| s.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.sizes.iter().map(|s| s.name.as_str()).collect()
    }

    /// The size a spec runs as: its named size; else the smallest size with at least its
    /// requested cpu; else the smallest size.
    pub fn effective_index(&self, spec: &RuntimeSpec) -> usize {
        if let Some(index) = spec.size.as_deref().and_then(|name| self.index(name)) {
            return index;
        }
        let cpu = spec.resources.as_ref().and_then(|r| r.cpu);
        match cpu {
            Some(cpu) => self.sizes.iter().position(|s| s.cpu >= cpu).unwrap_or(self.sizes.len().saturating_sub(1)),
            None => 0,
        }
    }

    /// Replicas a spec runs with: its own count, or its size's.
    pub fn replicas(&self, spec: &RuntimeSpec) -> i64 {
        let explicit = spec.resources.as_ref().and_then(|r| r.replicas).filter(|r| *r > 0);
        explicit.unwrap_or_else(|| self.sizes.get(self.effective_index(spec)).map_or(1, |s| s.replicas))
    }

    /// What a spec costs per hour while running: its size's price, scaled by its replica count
    /// relative to the size's, and by how far explicit `resources` (cpu, memory) exceed what
    /// the size gives: a `small` with 64 CPUs is priced as 64 of them, not as a `small`.
    pub fn running_cost(&self, spec: &RuntimeSpec) -> f64 {
        let Some(size) = self.sizes.get(self.effective_index(spec)) else { return 0.0 };
        let base = size.replicas.max(1) as f64;
        size.cost_per_hour * self.replicas(spec) as f64 / base * Self::excess(spec, size)
    }

    /// How many times over a spec's explicit cpu or memory exceeds its size's (at least 1).
    fn excess(spec: &RuntimeSpec, size: &SizeEntry) -> f64 {
        let Some(resources) = &spec.resources else { return 1.0 };
        let cpu = resources.cpu.filter(|_| size.cpu > 0.0).map_or(1.0, |cpu| cpu / size.cpu);
        let memory = match (resources.memory.as_deref().and_then(quantity_bytes), quantity_bytes(&size.memory)) {
            (Some(asked), Some(given)) if given > 0 => asked as f64 / given as f64,
            _ => 1.0,
        };
        cpu.max(memory).max(1.0)
    }

    /// What a runtime costs per hour in its state: nothing unless it runs (or is coming up).
    pub fn cost(&self, runtime: &Runtime) -> f64 {
        self.cost_in(runtime.state, &runtime.spec)
    }

    /// What a runtime with `spec` costs per hour in `state`.
    pub fn cost_in(&self, state: RuntimeState, spec: &RuntimeSpec) -> f64 {
        match state {
            RuntimeState::Running | RuntimeState::Degraded | RuntimeState::Creating => self.running_cost(spec),
            _ => 0.0,
        }
    }

    /// A resource profile for `replicas` replicas that keeps the spec's other resources.
    pub fn with_replicas(spec: &RuntimeSpec, replicas: i64) -> ResourceProfile {
        ResourceProfile { replicas: Some(replicas), ..spec.resources.clone().unwrap_or_default() }
    }

    /// Checks a catalogue an operator submits: `Err((field path, message))`.
    pub fn validate(sizes: &[SizeEntry]) -> Result<(), (String, String)> {
        if sizes.is_empty() {
            return Err(("$.sizes".into(), "give at least one size".into()));
        }
        for (i, size) in sizes.iter().enumerate() {
            let path = |field: &str| format!("$.sizes[{i}].{field}");
            let name_ok = !size.name.is_empty()
                && size.name.len() <= 63
                && size.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                return Err((path("name"), "must be 1-63 lowercase letters, digits or '-'".into()));
            }
            if sizes[..i].iter().any(|s| s.name == size.name) {
                return Err((path("name"), format!("size {:?} is listed twice", size.name)));
            }
            if !(size.cpu.is_finite() && size.cpu > 0.0 && size.cpu <= 1024.0) {
                return Err((path("cpu"), "must be above 0 and at most 1024".into()));
            }
            if !(1..=1000).contains(&size.replicas) {
                return Err((path("replicas"), "must be between 1 and 1000".into()));
            }
            if !(size.cost_per_hour.is_finite() && size.cost_per_hour >= 0.0) {
                return Err((path("cost_per_hour"), "must be a number of at least 0".into()));
            }
            if let Some(previous) = i.checked_sub(1).map(|p| &sizes[p]) {
                if size.cost_per_hour < previous.cost_per_hour || size.cpu < previous.cpu {
                    return Err((
                        path("name"),
                        "sizes are listed smallest first: cpu and cost must not decrease".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::default_sizes;

    #[test]
    fn cost_follows_size_and_replicas() {
        let sizes = default_sizes();
        let catalogue = Catalogue::new(&sizes);
        let mut spec = RuntimeSpec { size: Some("large".into()), ..Default::default() };
        assert_eq!(catalogue.replicas(&spec), 2);
        assert!((catalogue.running_cost(&spec) - 0.40).abs() < 1e-9);
        spec.resources = Some(Catalogue::with_replicas(&spec, 4));
        assert!((catalogue.running_cost(&spec) - 0.80).abs() < 1e-9, "twice the replicas, twice the price");
        let by_cpu = RuntimeSpec {
            resources: Some(ResourceProfile { cpu: Some(3.0), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(catalogue.effective_index(&by_cpu), 2, "3 vCPUs fit in large");
        assert_eq!(catalogue.effective_index(&RuntimeSpec::default()), 0);
    }

    #[test]
    fn a_bad_catalogue_is_refused_with_its_field() {
        let mut sizes = default_sizes();
        assert!(Catalogue::validate(&sizes).is_ok());
        sizes[2].cost_per_hour = 0.01;
        assert_eq!(Catalogue::validate(&sizes).unwrap_err().0, "$.sizes[2].name");
        let mut sizes = default_sizes();
        sizes[1].name = "small".into();
        assert!(Catalogue::validate(&sizes).unwrap_err().1.contains("twice"));
        assert_eq!(Catalogue::validate(&[]).unwrap_err().0, "$.sizes");
    }
}
