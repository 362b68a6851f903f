#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore

/// How many event loops the proxy runs when `--concurrency` is not given: one per CPU it may
/// actually use, not one per CPU the machine has.
///
/// A proxy pinned with `taskset -c 1`, or in a container with `cpus: "1.0"` (Docker's
/// `--cpus`, Kubernetes' `limits.cpu`), that started a loop per machine core would run two or
/// more loops time-sharing one core: each with its own upstream connections and its own share
/// of every batch, for more context switches and no more throughput. So the default is the
/// smaller of the CPUs in the process's affinity mask and the cgroup's CPU quota rounded up.
public enum CPUBudget {
  public static func defaultEventLoops() -> Int {
    let cpus = Self.affinityCPUs() ?? System.coreCount
    return Self.eventLoops(cpus: cpus, quota: Self.cgroupQuota())
  }

  /// `cpus` limited by a quota in CPUs (1.5 means one and a half), at least one.
  static func eventLoops(cpus: Int, quota: Double?) -> Int {
    guard let quota, quota > 0 else { return max(1, cpus) }
    return max(1, min(cpus, Int(quota.rounded(.up))))
  }

  /// cgroup v2 `cpu.max`: "max 100000" (no limit) or "150000 100000" (quota, period).
  static func quota(cpuMax: String) -> Double? {
    let parts = cpuMax.split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard parts.count >= 2, let quota = Double(parts[0]), let period = Double(parts[1]), period > 0 else { return nil }
    return quota / period
  }

  /// cgroup v1 `cpu.cfs_quota_us` (-1: no limit) and `cpu.cfs_period_us`.
  static func quota(cfsQuotaUs: String, cfsPeriodUs: String) -> Double? {
    guard let quota = Double(cfsQuotaUs.trimmingNewlines), quota > 0,
      let period = Double(cfsPeriodUs.trimmingNewlines), period > 0
    else { return nil }
    return quota / period
  }

  private static func cgroupQuota() -> Double? {
    // Inside a container the process's own cgroup is mounted at the root of the hierarchy.
    if let max = Self.read("/sys/fs/cgroup/cpu.max") { return Self.quota(cpuMax: max) }
    for dir in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
      if let quota = Self.read(dir + "/cpu.cfs_quota_us"), let period = Self.read(dir + "/cpu.cfs_period_us") {
        return Self.quota(cfsQuotaUs: quota, cfsPeriodUs: period)
      }
    }
    return nil
  }

  /// The CPUs in the affinity mask, from `Cpus_allowed_list` in /proc/self/status (Glibc's
  /// module does not import sched_getaffinity).
  private static func affinityCPUs() -> Int? {
    guard let file = fopen("/proc/self/status", "r") else { return nil }
    defer { fclose(file) }
    var buffer = [CChar](repeating: 0, count: 4096)
    while fgets(&buffer, Int32(buffer.count), file) != nil {
      let line = String(cString: buffer)
      if line.hasPrefix("Cpus_allowed_list:") {
        return Self.count(cpuList: String(line.dropFirst("Cpus_allowed_list:".count)))
      }
    }
    return nil
  }

  /// A kernel CPU list ("0-3,8,10-11") as a number of CPUs, nil if it is not one.
  static func count(cpuList: String) -> Int? {
    var total = 0
    for part in cpuList.split(separator: ",") {
      let range = part.split(separator: "-").map { $0.trimmingCharacters(in: " \t\n") }
      guard let first = range.first.flatMap({ Int($0) }) else { return nil }
      let last = range.count > 1 ? Int(range[1]) : first
      guard let last, last >= first else { return nil }
      total += last - first + 1
    }
    return total > 0 ? total : nil
  }

  private static func read(_ path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var buffer = [CChar](repeating: 0, count: 256)
    guard fgets(&buffer, Int32(buffer.count), file) != nil else { return nil }
    return String(cString: buffer)
  }
}

extension StringProtocol {
  fileprivate var trimmingNewlines: Substring { self.trimmingCharacters(in: " \n") }

  fileprivate func trimmingCharacters(in set: String) -> Substring {
    var s = Substring(self)
    while let first = s.first, set.contains(first) { s = s.dropFirst() }
    while let last = s.last, set.contains(last) { s = s.dropLast() }
    return s
  }
}
