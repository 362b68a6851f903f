import NIOCore
import Testing

@testable import GRPCWebProxy

@Suite struct CPUBudgetTests {
  @Test func aQuotaCapsTheLoopsRoundedUp() {
    #expect(CPUBudget.eventLoops(cpus: 8, quota: nil) == 8)
    #expect(CPUBudget.eventLoops(cpus: 8, quota: 1.0) == 1)
    #expect(CPUBudget.eventLoops(cpus: 8, quota: 1.5) == 2)
    #expect(CPUBudget.eventLoops(cpus: 2, quota: 4) == 2)
    #expect(CPUBudget.eventLoops(cpus: 4, quota: 0.25) == 1)
    #expect(CPUBudget.eventLoops(cpus: 0, quota: nil) == 1)
  }

  @Test func cgroupFilesAreRead() {
    #expect(CPUBudget.quota(cpuMax: "max 100000\n") == nil)
    #expect(CPUBudget.quota(cpuMax: "150000 100000\n") == 1.5)
    #expect(CPUBudget.quota(cfsQuotaUs: "-1\n", cfsPeriodUs: "100000\n") == nil)
    #expect(CPUBudget.quota(cfsQuotaUs: "100000\n", cfsPeriodUs: "100000\n") == 1.0)
  }

  @Test func cpuListsAreCounted() {
    #expect(CPUBudget.count(cpuList: "0-1\n") == 2)
    #expect(CPUBudget.count(cpuList: "1") == 1)
    #expect(CPUBudget.count(cpuList: "0-3,8,10-11") == 7)
    #expect(CPUBudget.count(cpuList: "") == nil)
    #expect(CPUBudget.count(cpuList: "3-1") == nil)
  }

}
